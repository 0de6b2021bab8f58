"""BitFit adapters: each keeps its own copy of the targeted biases and swaps it into the model.

Every targeted module (the "host") gets a child ``bitfit`` (:class:`BitFitBiases`)
holding the host's original bias and one trained bias per adapter, so they move
with ``model.to(...)``. The host's ``bias`` parameter *is* the active adapter's
trained bias (or the original when none is active): switching adapters swaps
parameter objects, nothing is added or subtracted, so switching, disabling and
unloading restore the original biases bit for bit. A forward pass costs
exactly what the base model costs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import Adapter, InjectError, MergeError
from peftkit.io import PEFT_PREFIX, check_tensors, first_few
from peftkit.targeting import ALL_LINEAR, name_matches, output_head_names
from peftkit_bitfit.config import BitFitConfig

HOLDER = "bitfit"  # the attribute under which a host keeps its BitFitBiases
NOISE_STD = 0.1  # the noise init_weights=False adds, large enough to move a tiny model's outputs


class BitFitBiases(nn.Module):
    """One host's original bias (``None`` if it had none) and each adapter's trained bias."""

    def __init__(self, original: nn.Parameter | None) -> None:
        super().__init__()
        self.register_parameter("original", original)
        self.trained = nn.ParameterDict()
        self.pre_merge: torch.Tensor | None = None  # the original values while an adapter is merged


class BitFitAdapter(Adapter):
    """One BitFit adapter: a trained bias per targeted module."""

    def __init__(self, name: str, config: BitFitConfig, hosts: dict[str, nn.Module]) -> None:
        super().__init__(name, config, list(hosts))
        self.hosts = hosts

    def holders(self) -> Iterator[tuple[str, nn.Module, BitFitBiases]]:
        for target, host in self.hosts.items():
            yield target, host, getattr(host, HOLDER)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, _, holder in self.holders():
            yield holder.trained[self.name]

    def set_active(self, active: bool) -> None:
        for _, host, holder in self.holders():
            mine = holder.trained[self.name]
            if active:
                host.bias = mine
            elif host._parameters["bias"] is mine:
                host.bias = holder.original

    @property
    def added_biases(self) -> list[str]:
        """Targets that had no bias before BitFit gave them one."""
        return [target for target, _, holder in self.holders() if holder.original is None]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``base_model.model.<module>.bias`` for every target: the trained biases only."""
        return {
            f"{PEFT_PREFIX}{target}.bias": holder.trained[self.name].detach() for target, _, holder in self.holders()
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved biases in, after checking every key and shape (nothing changes on error)."""
        check_tensors(
            tensors,
            self.state_dict(),
            "BitFit adapter",
            "is it for another base model, or were its target_modules / add_missing_biases changed?",
        )
        with torch.no_grad():
            for target, _, holder in self.holders():
                bias = holder.trained[self.name]
                bias.copy_(tensors[f"{PEFT_PREFIX}{target}.bias"].to(bias.dtype))

    # ---------------------------------------------------------------- merge
    def merge(self) -> None:
        """Write the trained biases into the original bias parameters (the model's own)."""
        added = self.added_biases
        if added:
            raise MergeError(
                f"BitFit adapter {self.name!r} added biases the base model does not have ({first_few(added)}); merging "
                f"would change the model's architecture, so use it unmerged (add_missing_biases=True)"
            )
        with torch.no_grad():
            for _, host, holder in self.holders():
                holder.pre_merge = holder.original.detach().clone()
                holder.original.copy_(holder.trained[self.name])
                host.bias = holder.original
        self.merged = True

    def unmerge(self) -> None:
        """Give the original bias parameters back their values and swap the trained ones in again."""
        with torch.no_grad():
            for _, host, holder in self.holders():
                if holder.pre_merge is not None:
                    holder.original.copy_(holder.pre_merge)
                    holder.pre_merge = None
                host.bias = holder.trained[self.name]
        self.merged = False

    def unload(self) -> None:
        """Remove this adapter's biases; a host with no adapter left gets its original bias (or none) back."""
        for _, host, holder in self.holders():
            if host._parameters["bias"] is holder.trained[self.name]:
                host.bias = holder.original
            del holder.trained[self.name]
            holder.pre_merge = None  # a merged adapter's values stay in the original parameter
            if not len(holder.trained):
                host.bias = holder.original
                delattr(host, HOLDER)
        self.hosts = {}


def _original_bias(module: nn.Module) -> nn.Parameter | None:
    """The module's own bias: kept by its holder while a BitFit adapter is installed."""
    holder = getattr(module, HOLDER, None)
    return holder.original if isinstance(holder, BitFitBiases) else module._parameters.get("bias")


def _can_add_bias(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and "bias" in module._parameters


def _candidates(model: nn.Module, config: BitFitConfig) -> Iterator[tuple[str, nn.Module]]:
    """Modules the config names, in model order, outside peftkit wrappers and modules_to_save."""
    heads = output_head_names(model)
    skipped: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(skipped):
            continue
        # BitFit's own holders, another method's layers, modules_to_save copies and the modules they name.
        if isinstance(module, BitFitBiases) or getattr(module, "is_peftkit_wrapper", False):
            skipped += (name + ".",)
            continue
        if name_matches(name, config.modules_to_save):
            skipped += (name + ".",)
            continue
        if name_matches(name, config.exclude_modules):
            continue
        if config.target_modules is None:
            addable = config.add_missing_biases and _can_add_bias(module) and name not in heads
            named = _original_bias(module) is not None or addable
        elif config.target_modules == ALL_LINEAR:
            named = isinstance(module, (nn.Linear, Conv1D)) and name not in heads
        else:
            named = name_matches(name, config.target_modules)
        if named:
            yield name, module


def select_hosts(model: nn.Module, config: BitFitConfig) -> dict[str, nn.Module]:
    """The modules whose bias the adapter trains; raises :class:`InjectError` with what to change."""
    hosts: dict[str, nn.Module] = {}
    lacking: list[str] = []
    for name, module in _candidates(model, config):
        if _original_bias(module) is not None or (config.add_missing_biases and _can_add_bias(module)):
            hosts[name] = module
        else:
            lacking.append(f"{name} ({type(module).__name__})")
    if lacking:
        hint = (
            "only Linear and Conv1D layers can be given a bias; narrow target_modules"
            if config.add_missing_biases
            else "set add_missing_biases=True to give Linear layers a zero bias to train, or narrow target_modules"
        )
        raise InjectError(f"BitFit target modules have no bias: {first_few(lacking)}; {hint}")
    if not hosts:
        if config.target_modules is None:
            raise InjectError(
                f"{type(model).__name__} has no bias parameters to train (Llama and T5 models have none); "
                f"set add_missing_biases=True to add zero-initialised biases to its Linear layers"
            )
        raise InjectError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}; "
            f"module names look like {[n for n, _ in model.named_modules() if n][:6]}"
        )
    return hosts


def inject(model: nn.Module, config: BitFitConfig, adapter_name: str) -> BitFitAdapter:
    """Give each targeted module a trained copy of its bias (a zero bias where it had none)."""
    hosts = select_hosts(model, config)
    trained: dict[str, nn.Parameter] = {}
    for name, host in hosts.items():
        original = _original_bias(host)
        if original is not None:
            value = original.detach().clone()
        else:
            weight = host.weight
            size = weight.shape[1] if isinstance(host, Conv1D) else weight.shape[0]
            value = torch.zeros(size, dtype=weight.dtype, device=weight.device)
        if not config.init_weights:
            value = value + torch.randn_like(value) * NOISE_STD
        trained[name] = nn.Parameter(value)
    for name, host in hosts.items():  # every bias is built before the model changes
        holder = getattr(host, HOLDER, None)
        if not isinstance(holder, BitFitBiases):
            holder = BitFitBiases(_original_bias(host))
            host.add_module(HOLDER, holder)
        holder.trained[adapter_name] = trained[name]
    return BitFitAdapter(adapter_name, config, hosts)
