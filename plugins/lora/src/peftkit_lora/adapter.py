"""Adding a LoRA adapter to a model, and what the other hooks do with it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from peftkit import AdapterLoadError, LayerAdapter
from peftkit.io import PEFT_PREFIX, check_tensors
from peftkit.targeting import get_submodule_parent, pattern_value, select_modules
from peftkit_lora.config import LoraConfig
from peftkit_lora.layers import LoraLayer, MixedRows, lora_layer_for


class LoraAdapter(LayerAdapter):
    """One LoRA adapter: the layers it lives in and the biases it trains."""

    layers: dict[str, LoraLayer]

    def __init__(self, name: str, config: LoraConfig, model: nn.Module, layers: dict[str, LoraLayer]) -> None:
        super().__init__(name, config, model, layers)
        self.biases = _trained_biases(model, layers, config.bias)
        self._original_biases = {k: p.detach().clone() for k, p in self.biases.items()}

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            for attr in layer.adapter_attrs:
                item = getattr(layer, attr)[self.name]
                yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())
        yield from self.biases.values()

    def layer_rows(self, rows: dict[str, torch.Tensor]) -> MixedRows:
        """The batch's rows grouped once per call, for every layer (and every LoRA adapter of the call) to share."""
        return MixedRows.for_rows(rows)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under Hugging Face PEFT's keys, adapter name stripped."""
        tensors = {}
        for target, layer in self.layers.items():
            for attr in layer.adapter_attrs:
                item = getattr(layer, attr)[self.name]
                if isinstance(item, nn.Parameter):
                    tensors[f"{PEFT_PREFIX}{target}.{attr}"] = item
                else:
                    for key, value in item.state_dict().items():
                        tensors[f"{PEFT_PREFIX}{target}.{attr}.{key}"] = value
        for key, bias in self.biases.items():
            tensors[f"{PEFT_PREFIX}{key}"] = bias
        return {k: v.detach() for k, v in tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in, after checking every key and shape (nothing changes on error)."""
        expected = self.state_dict()
        given = dict(tensors)
        base_copies = {k: given.pop(k) for k in list(given) if self._is_saved_embedding(k)}
        check_tensors(given, expected, "LoRA adapter", "is it for another base model or were its files edited?")
        live = self._live_tensors()
        with torch.no_grad():
            for key, value in given.items():
                live[key].copy_(value.to(live[key].dtype))
            for key, value in base_copies.items():
                weight = self.model.get_submodule(key[len(PEFT_PREFIX) : -len(".weight")]).weight
                if weight.shape != value.shape:
                    raise AdapterLoadError(f"{key}: file {tuple(value.shape)}, model {tuple(weight.shape)}")
                if not torch.equal(weight, value.to(weight.dtype)):
                    warnings.warn(f"adapter carries its own {key} (saved by PEFT's save_embedding_layers); loading it into the base model", stacklevel=4)
                    weight.copy_(value.to(weight.dtype))

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        live: dict[str, torch.Tensor] = {}
        for target, layer in self.layers.items():
            for attr in layer.adapter_attrs:
                item = getattr(layer, attr)[self.name]
                if isinstance(item, nn.Parameter):
                    live[f"{PEFT_PREFIX}{target}.{attr}"] = item.data
                else:
                    for key, value in item.state_dict(keep_vars=True).items():
                        live[f"{PEFT_PREFIX}{target}.{attr}.{key}"] = value.data
        for key, bias in self.biases.items():
            live[f"{PEFT_PREFIX}{key}"] = bias.data
        return live

    def _is_saved_embedding(self, key: str) -> bool:
        suffix = ".base_layer.weight"
        if not key.startswith(PEFT_PREFIX) or not key.endswith(suffix):
            return False
        target = key[len(PEFT_PREFIX) : -len(suffix)]
        return target in self.layers and isinstance(self.layers[target].base_layer, nn.Embedding)

    # -------------------------------------------------------------- removal
    def unload(self) -> None:
        """Remove this adapter; layers left with no adapter go back to their base module, biases to their values."""
        super().unload()
        if not self.merged:
            with torch.no_grad():
                for key, bias in self.biases.items():
                    bias.copy_(self._original_biases[key])


def _trained_biases(model: nn.Module, layers: dict[str, LoraLayer], mode: str) -> dict[str, nn.Parameter]:
    if mode == "none":
        return {}
    if mode == "lora_only":
        return {f"{t}.base_layer.bias": l.base_layer.bias for t, l in layers.items() if getattr(l.base_layer, "bias", None) is not None}
    biases: dict[str, nn.Parameter] = {}
    inside_other_wrappers: tuple[str, ...] = ()  # other adapters' modules and saved heads: not base biases
    for name, module in model.named_modules():
        if name and name.startswith(inside_other_wrappers):
            continue
        if getattr(module, "is_peftkit_wrapper", False) and not isinstance(module, LoraLayer):
            inside_other_wrappers += (name + ".",)
            continue
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            biases[f"{name}.bias" if name else "bias"] = bias
    return biases


def _is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return lora_layer_for(base) is not None and not isinstance(base, (nn.Embedding, nn.Conv2d))


def _supported(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or lora_layer_for(module) is not None


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> LoraAdapter:
    """Wrap each target module in a LoRA layer (or add to an existing one) and return the adapter."""
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
    layers: dict[str, LoraLayer] = {}
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, LoraLayer) else lora_layer_for(module)(module)  # type: ignore[misc]
        r = pattern_value(config.rank_pattern, target, config.r)
        alpha = pattern_value(config.alpha_pattern, target, config.lora_alpha)
        layer.add_adapter(adapter_name, r, config.scaling(r, alpha), config.lora_dropout, config.init_lora_weights)
        layers[target] = layer
    for target, layer in layers.items():  # every layer is built before the model changes
        parent, attr = get_submodule_parent(model, target)
        if getattr(parent, attr) is not layer:
            setattr(parent, attr, layer)
    return LoraAdapter(adapter_name, config, model, layers)
