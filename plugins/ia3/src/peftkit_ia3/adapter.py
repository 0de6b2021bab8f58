"""Adding an (IA)^3 adapter to a model, and what the other hooks do with it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import InjectError, LayerAdapter
from peftkit.io import PEFT_PREFIX, check_tensors
from peftkit.targeting import get_submodule_parent, select_modules
from peftkit_ia3.config import IA3Config
from peftkit_ia3.layers import IA3Layer, ia3_layer_for

# PEFT's defaults per ``model.config.model_type``: (target_modules, feedforward_modules).
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


class IA3Adapter(LayerAdapter):
    """One (IA)^3 adapter: the wrapped layers holding its vectors."""

    layers: dict[str, IA3Layer]

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.ia3_l[self.name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``base_model.model.<module>.ia3_l`` for every target, as Hugging Face PEFT writes them."""
        return {
            f"{PEFT_PREFIX}{target}.ia3_l": layer.ia3_l[self.name].detach() for target, layer in self.layers.items()
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved vectors in, after checking every key and shape (nothing changes on error)."""
        check_tensors(
            tensors,
            self.state_dict(),
            "(IA)^3 adapter",
            "is it for another base model, or were its feedforward_modules changed?",
        )
        with torch.no_grad():
            for target, layer in self.layers.items():
                vector = layer.ia3_l[self.name]
                vector.copy_(tensors[f"{PEFT_PREFIX}{target}.ia3_l"].to(vector.dtype))


def is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry matches the end of the name."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def resolve_defaults(model: nn.Module, config: IA3Config) -> None:
    """Fill ``target_modules`` / ``feedforward_modules`` left at ``None`` with PEFT's per-architecture defaults."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = DEFAULT_MODULES.get(model_type or "")
    if config.target_modules is None:
        if defaults is None:
            raise InjectError(
                f"(IA)^3 has no default target_modules for {type(model).__name__} (model_type {model_type!r}); "
                f"set target_modules (e.g. the key, value and feed-forward output layers) and feedforward_modules"
            )
        config.target_modules = list(defaults[0])
    if config.feedforward_modules is None:
        # Unlike PEFT, an unknown architecture is not an error: none of its targets is feed-forward.
        config.feedforward_modules = list(defaults[1]) if defaults is not None else []


def _is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, IA3Layer) else module
    return isinstance(base, (nn.Linear, Conv1D))


def _supported(module: nn.Module) -> bool:
    return isinstance(module, IA3Layer) or ia3_layer_for(module) is not None


def inject(model: nn.Module, config: IA3Config, adapter_name: str) -> IA3Adapter:
    """Wrap each target in an (IA)^3 layer (or add to an existing one) and return the adapter."""
    resolve_defaults(model, config)
    assert config.feedforward_modules is not None
    targets = select_modules(
        model,
        config.target_modules,
        supported=_supported,
        is_linear=_is_linear,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
    )
    layers: dict[str, IA3Layer] = {}
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, IA3Layer) else ia3_layer_for(module)(module)  # type: ignore[misc]
        layer.add_adapter(adapter_name, is_feedforward(target, config.feedforward_modules), config.init_ia3_weights)
        layers[target] = layer
    if any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()):
        config.fan_in_fan_out = True  # as PEFT records it for GPT-2's Conv1D
    for target, layer in layers.items():  # every layer is built before the model changes
        parent, attr = get_submodule_parent(model, target)
        if getattr(parent, attr) is not layer:
            setattr(parent, attr, layer)
    return IA3Adapter(adapter_name, config, model, layers)
