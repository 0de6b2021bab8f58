"""Adding a bottleneck adapter to a model, and what the other hooks do with it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import InjectError, LayerAdapter, MergeError
from peftkit.io import PEFT_PREFIX, check_tensors, first_few
from peftkit.targeting import get_submodule_parent, select_modules
from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.layers import BottleneckLayer

# Per ``model.config.model_type``: (attention output, feed-forward output), as full-match regexes.
PLACEMENTS: dict[str, tuple[str, str]] = {
    "bert": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "roberta": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "mistral": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "qwen2": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    "t5": (r".*\.SelfAttention\.o", r".*\.DenseReluDense\.wo"),
}


class BottleneckAdapter(LayerAdapter):
    """One bottleneck adapter: the wrapped modules holding its down- and up-projections."""

    layers: dict[str, BottleneckLayer]

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.bottleneck[self.name].parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``base_model.model.<module>.bottleneck.{down,up}.{weight,bias}``, adapter name stripped."""
        return {
            f"{PEFT_PREFIX}{target}.bottleneck.{key}": value.detach()
            for target, layer in self.layers.items()
            for key, value in layer.bottleneck[self.name].state_dict().items()
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in, after checking every key and shape (nothing changes on error)."""
        check_tensors(
            tensors,
            self.state_dict(),
            "bottleneck adapter",
            "is it for another base model, or were its adapter_type, reduction_factor or target_modules changed?",
        )
        with torch.no_grad():
            for target, layer in self.layers.items():
                prefix = f"{PEFT_PREFIX}{target}.bottleneck."
                for key, value in layer.bottleneck[self.name].state_dict(keep_vars=True).items():
                    value.copy_(tensors[prefix + key].to(value.dtype))

    def merge(self) -> None:
        raise MergeError(
            f"bottleneck adapter {self.name!r} cannot be merged: its non-linearity is not a change of the base "
            f"weights; keep it unmerged, or use unload() to remove it"
        )

    unmerge = merge


def resolve_targets(model: nn.Module, config: BottleneckConfig) -> None:
    """Fill ``target_modules`` from the architecture's placement for the adapter type, if it is unset."""
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLACEMENTS:
        raise InjectError(
            f"bottleneck adapters have no default placement for {type(model).__name__} (model_type {model_type!r}); "
            f"set target_modules to its attention-output and feed-forward-output modules, e.g. "
            f"['attention.output.dense', 'mlp.down_proj']"
        )
    attention, feedforward = PLACEMENTS[model_type]
    config.target_modules = feedforward if config.adapter_type == "pfeiffer" else f"(?:{attention})|(?:{feedforward})"


def _features(model: nn.Module, name: str, module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a module an adapter wraps."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # type: ignore[return-value]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise InjectError(
            f"cannot tell the hidden size of {name!r} ({type(module).__name__}): target Linear layers, or a model "
            f"whose config has hidden_size"
        )
    return hidden, hidden


def _is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, BottleneckLayer) else module
    return isinstance(base, (nn.Linear, Conv1D))


def _supported(module: nn.Module) -> bool:
    """Linear and Conv1D layers, and whole blocks (modules with children, such as an MLP or attention)."""
    return isinstance(module, (nn.Linear, Conv1D, BottleneckLayer)) or any(True for _ in module.children())


def inject(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> BottleneckAdapter:
    """Wrap each target module (or add to its existing wrapper) and return the adapter."""
    resolve_targets(model, config)
    targets = select_modules(
        model, config.target_modules, supported=_supported, is_linear=_is_linear, modules_to_save=config.modules_to_save
    )
    nested = [t for t in targets if any(t.startswith(o + ".") for o in targets)]
    if nested:
        raise InjectError(f"target_modules select modules inside other targets ({first_few(nested)}); pick one level")
    layers: dict[str, BottleneckLayer] = {}
    sizes: dict[str, int] = {}
    for target in targets:
        module = model.get_submodule(target)
        layer = (
            module
            if isinstance(module, BottleneckLayer)
            else BottleneckLayer(module, *_features(model, target, module))
        )
        sizes[target] = layer.out_features // config.reduction_factor
        if sizes[target] < 1:
            raise InjectError(
                f"reduction_factor {config.reduction_factor} leaves no bottleneck units for {target!r} "
                f"(hidden size {layer.out_features}); use a reduction_factor of at most {layer.out_features}"
            )
        layers[target] = layer
    parallel = config.adapter_type == "parallel"
    for target, layer in layers.items():
        layer.add_adapter(
            adapter_name, sizes[target], config.non_linearity, parallel, config.scaling, config.init_weights
        )
    for target, layer in layers.items():  # every layer is built before the model changes
        parent, attr = get_submodule_parent(model, target)
        if getattr(parent, attr) is not layer:
            setattr(parent, attr, layer)
    return BottleneckAdapter(adapter_name, config, model, layers)
