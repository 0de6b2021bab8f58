"""Adding an AdaLoRA adapter to a model, saving it at its allocated ranks, and its orthogonal regulariser.

The adapter builds on :class:`peftkit_lora.adapter.LoraAdapter` (parameters,
switching, mixed batches, merging, biases, checked loading); what it adds is
the rank allocator, the ``rank_pattern``-sized tensors on disk as Hugging Face
PEFT writes them, and the regulariser added to a loss the model returns.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import InjectError
from peftkit.io import PEFT_PREFIX
from peftkit.model import PeftModel
from peftkit.targeting import get_submodule_parent, select_modules
from peftkit_adalora.allocator import AllocationError, RankAllocator
from peftkit_adalora.config import AdaLoraConfig, module_rank_masks
from peftkit_adalora.layers import SVDLayer, SVDLinear, svd_layer_for
from peftkit_lora.adapter import LoraAdapter

# The AdaLoRA adapters of each live model, so that update_and_allocate(model, step) finds them.
_LIVE: weakref.WeakKeyDictionary[nn.Module, weakref.WeakValueDictionary[str, AdaLoraAdapter]] = (
    weakref.WeakKeyDictionary()
)


class AdaLoraAdapter(LoraAdapter):
    """One AdaLoRA adapter: its SVD layers, its rank allocator and its training hooks."""

    def __init__(
        self,
        name: str,
        config: AdaLoraConfig,
        model: nn.Module,
        layers: dict[str, SVDLayer],
        slots: dict[str, list[int]],
    ) -> None:
        super().__init__(name, config, model, layers)  # type: ignore[arg-type]
        self.config: AdaLoraConfig = config
        self.slots = slots
        self.allocator = RankAllocator(name, config, layers, slots)
        self.active = False
        self._hooks = [model.register_forward_hook(self._add_orthogonal_penalty)]
        for key, param in self.allocator.parameters_by_key().items():
            self._hooks.append(param.register_post_accumulate_grad_hook(self.allocator.recorder(key)))
        _LIVE.setdefault(model, weakref.WeakValueDictionary())[name] = self

    @property
    def trainable(self) -> bool:
        """Whether the adapter's weights are being trained (active and not loaded for inference)."""
        return any(p.requires_grad for p in self.allocator.parameters_by_key().values())

    def set_active(self, active: bool) -> None:
        super().set_active(active)
        self.active = active

    # ----------------------------------------------------------- regulariser
    def orthogonal_regularization(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean over modules of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` (PEFT's)."""
        norms = []
        for layer in self.layers.values():
            q, p = layer.lora_A[self.name], layer.lora_B[self.name]
            for gram in (q @ q.T, p.T @ p):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    def _add_orthogonal_penalty(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook: add the regulariser to the loss a model in training mode returns, if this adapter trains."""
        if not (module.training and self.active and self.config.orth_reg_weight > 0):
            return None
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or not self.trainable:
            return None
        output.loss = loss + self.orthogonal_regularization().to(loss.dtype)
        return output

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's tensors, keeping only the triplets ``rank_pattern`` keeps (as PEFT saves them)."""
        tensors = super().state_dict()
        masks = module_rank_masks(self.config.rank_pattern or {}, self.config.init_r)
        for target, slots in self.slots.items():
            if target not in masks:
                continue
            keep = torch.tensor([masks[target][slot] for slot in slots], dtype=torch.bool)
            if bool(keep.all()):
                continue
            prefix = f"{PEFT_PREFIX}{target}."
            for attr in ("lora_A", "lora_E"):
                tensors[prefix + attr] = tensors[prefix + attr][keep.to(tensors[prefix + attr].device)]
            tensors[prefix + "lora_B"] = tensors[prefix + "lora_B"][:, keep.to(tensors[prefix + "lora_B"].device)]
        return tensors

    def unload(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        live = _LIVE.get(self.model)
        if live is not None:
            live.pop(self.name, None)
        super().unload()


def find_adapter(model: nn.Module, adapter_name: str | None = None) -> AdaLoraAdapter:
    """The AdaLoRA adapter ``adapter_name`` of a PeftModel (default: its active adapter) or of an injected model."""
    base, name = (
        (model.base_model, adapter_name or model.active_adapter)
        if isinstance(model, PeftModel)
        else (model, adapter_name)
    )
    adapters = dict(_LIVE.get(base) or {})
    if not adapters:
        raise AllocationError(f"this {type(model).__name__} has no AdaLoRA adapter; add one with an AdaLoraConfig")
    if name is None and len(adapters) == 1:
        name = next(iter(adapters))
    if name not in adapters:
        raise AllocationError(
            f"adapter {name!r} is not an AdaLoRA adapter of this model; its AdaLoRA adapters are {sorted(adapters)}"
        )
    return adapters[name]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (SVDLinear, nn.Linear, Conv1D))


def _supported(module: nn.Module) -> bool:
    return isinstance(module, SVDLayer) or svd_layer_for(module) is not None


def inject(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> AdaLoraAdapter:
    """Wrap each target module in an SVD layer (or add to an existing one) and return the adapter.

    A config with a ``rank_pattern`` (a trained adapter being loaded) gets each
    module at its kept rank, as PEFT resizes them on load.
    """
    targets = select_modules(
        model,
        config.target_modules,
        supported=_supported,
        is_linear=_is_linear,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
    )
    masks = module_rank_masks(config.rank_pattern or {}, config.init_r)
    unknown = sorted(set(masks) - set(targets))
    if unknown:
        raise InjectError(f"rank_pattern names modules that target_modules does not select: {unknown[:5]}")
    layers: dict[str, SVDLayer] = {}
    slots: dict[str, list[int]] = {}
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, SVDLayer) else svd_layer_for(module)(module)  # type: ignore[misc]
        slots[target] = (
            [i for i, on in enumerate(masks[target]) if on] if target in masks else list(range(config.init_r))
        )
        layer.add_svd_adapter(
            adapter_name, len(slots[target]), config.scaling(), config.lora_dropout, config.init_lora_weights
        )
        layers[target] = layer
    for target, layer in layers.items():  # every layer is built before the model changes
        parent, attr = get_submodule_parent(model, target)
        if getattr(parent, attr) is not layer:
            setattr(parent, attr, layer)
    return AdaLoraAdapter(adapter_name, config, model, layers, slots)
