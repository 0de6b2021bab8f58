"""The work the hook wrappers do around LoRA: quantize, fit LoRA's layers, merge into quantized weights."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Generator
from typing import Any

import torch
from torch import nn

from peftkit import PeftModel
from peftkit.targeting import get_submodule_parent
from peftkit_lora.adapter import LoraAdapter
from peftkit_lora.layers import LoraLayer, LoraLinear
from peftkit_qlora.config import QLoraConfig
from peftkit_qlora.layers import MergedQuantLinear, QuantLoraLinear
from peftkit_qlora.quantize import (
    MERGED_MARK,
    QuantizationError,
    bnb,
    clear_quantization_marks,
    compute_dtype,
    disable_cpu_repacking,
    is_quantized,
    quant_format,
    quantize_layer,
    quantize_layers,
)


class QLoraMergeWarning(UserWarning):
    """Merging into quantized layers dequantizes them; requantizing rounds the merged weights."""


def quantize_for(model: nn.Module, config: QLoraConfig) -> dict[str, nn.Module]:
    """Quantize the base before LoRA injects (``QLoraConfig(quantize=True)``); returns the replaced modules."""
    fmt = quant_format(**config.quantization_options())
    return quantize_layers(model, fmt, config.modules_to_save or [], None, allow_requantize=False)


def fit_lora_layers(adapter: LoraAdapter) -> None:
    """After LoRA injected: LoRA layers over quantized bases compute their delta in the compute dtype."""
    if not isinstance(adapter, LoraAdapter):
        return
    for layer in adapter.layers.values():
        if is_quantized(layer.base_layer):
            disable_cpu_repacking(layer.base_layer)
            if type(layer) is LoraLinear:
                layer.__class__ = QuantLoraLinear


def merge_around(adapter: LoraAdapter, action: str) -> Generator[None, Any, Any]:
    """The body of the ``peftkit_merge`` wrapper: yields once, to LoRA's merge, unmerge or unload."""
    layers = (
        {t: layer for t, layer in adapter.layers.items() if _quantized_base(layer)}
        if isinstance(adapter, LoraAdapter)
        else {}
    )
    if not layers:
        return (yield)
    if action == "merge":
        return (yield from _merge(adapter, layers))
    if action == "unmerge":
        result = yield
        for layer in layers.values():
            if isinstance(layer.base_layer, MergedQuantLinear) and not layer.merged_adapters:
                layer.base_layer = layer.base_layer.quantized  # the original 4-bit weights, untouched
        return result
    model = adapter.model
    result = yield  # unload: LoRA puts each layer's base back into the model
    for target in layers:
        module = model.get_submodule(target)
        if isinstance(module, MergedQuantLinear):
            parent, attr = get_submodule_parent(model, target)
            setattr(parent, attr, module.as_linear())
    clear_quantization_marks(model)
    return result


def _merge(adapter: LoraAdapter, layers: dict[str, LoraLayer]) -> Generator[None, Any, Any]:
    model_dtype = _model_dtype(adapter.model)
    swapped = []
    for layer in layers.values():
        if is_quantized(layer.base_layer):
            layer.base_layer = MergedQuantLinear(layer.base_layer, model_dtype or compute_dtype(layer.base_layer))
            swapped.append(layer)
    try:
        result = yield  # LoRA adds its delta to the dense stand-ins' weights
    except BaseException:
        for layer in swapped:
            layer.base_layer = layer.base_layer.quantized
        raise
    dtypes = sorted({str(layer.base_layer.weight.dtype).removeprefix("torch.") for layer in layers.values()})
    warnings.warn(
        f"merged adapter {adapter.name!r} into {len(layers)} quantized layers by dequantizing them to "
        f"{'/'.join(dtypes)}: they stay dense until unmerge (more memory), and merged outputs equal unmerged ones "
        f"up to rounding in the compute dtype. merge_and_unload() returns them dense; "
        f"peftkit_qlora.merge_and_unload(model, requantize=True) quantizes them again (lossy)",
        QLoraMergeWarning,
        stacklevel=_caller_level(),
    )
    return result


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside peftkit and pluggy."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(
        part in frame.f_code.co_filename for part in ("/peftkit/", "/peftkit_", "/pluggy/")
    ):
        frame, level = frame.f_back, level + 1
    return level


def _quantized_base(layer: LoraLayer) -> bool:
    return is_quantized(layer.base_layer) or isinstance(layer.base_layer, MergedQuantLinear)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's dense weights: its input embeddings', else its first dense base weight's."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if isinstance(getattr(embedding, "weight", None), torch.Tensor):
        return embedding.weight.dtype
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point and not is_quantized_param(param) and ".lora_" not in name:
            return param.dtype
    return None


def is_quantized_param(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def merge_and_unload(model: PeftModel, *, requantize: bool = False) -> nn.Module:
    """``model.merge_and_unload()``, and with ``requantize=True`` the merged layers quantized again.

    Without ``requantize`` the merged layers are dense, in the dtype of the
    model's other weights (the compute dtype in the usual bf16 setup); outputs
    equal the unmerged ones up to rounding. ``requantize=True`` is the explicit
    opt-in to rounding the merged weights back to their 4-bit/8-bit format:
    the model is as small as before, but the adapter's update is partly lost.
    """
    base = model.get_base_model()
    marks = {
        key: getattr(base, key) for key in ("hf_quantizer", "quantization_method", "is_quantized") if hasattr(base, key)
    }
    config = getattr(base, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    merged = model.merge_and_unload()
    if not requantize:
        return merged
    targets = [(name, module) for name, module in merged.named_modules() if getattr(module, MERGED_MARK, None)]
    if not targets:
        raise QuantizationError("requantize=True but no merged layer came from a quantized one")
    warnings.warn(
        f"requantizing {len(targets)} merged layers rounds them to their quantized format; outputs will differ "
        f"from the unmerged model by about the quantization error, which can exceed the adapter's own update",
        QLoraMergeWarning,
        stacklevel=_caller_level(),
    )
    lib = bnb()
    for name, module in targets:
        parent, attr = get_submodule_parent(merged, name)
        setattr(parent, attr, quantize_layer(lib, module, getattr(module, MERGED_MARK)))
    for key, value in marks.items():
        setattr(merged, key, value)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return merged
