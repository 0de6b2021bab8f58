"""Quantizing a model's linear layers with bitsandbytes, and turning quantized layers back into dense ones.

bitsandbytes is imported lazily (:func:`bnb`), so that listing plugins or
using LoRA on an unquantized model never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import PeftkitError
from peftkit.modules_to_save import TASK_HEADS
from peftkit.targeting import get_submodule_parent, name_matches, output_head_names

INSTALL_HINT = "pip install 'bitsandbytes>=0.45'"
# Set on a dense Linear that holds merged adapter weights dequantized from a bitsandbytes layer.
MERGED_MARK = "peftkit_merged_from"


class BitsAndBytesUnavailableError(PeftkitError, ImportError):
    """bitsandbytes is missing or cannot run here."""


class QuantizationError(PeftkitError, ValueError):
    """A layer cannot be quantized as asked (already quantized, or holding merged adapter weights)."""


def bnb() -> ModuleType:
    """The bitsandbytes module, or a clear error naming what to install."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a broken native library raising anything
        raise BitsAndBytesUnavailableError(
            f"QLoRA needs bitsandbytes, which failed to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (never imports bitsandbytes)."""
    lib = sys.modules.get("bitsandbytes")
    return lib is not None and isinstance(module, (lib.nn.Linear4bit, lib.nn.Linear8bitLt))


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every bitsandbytes linear layer of ``model``."""
    return ((name, module) for name, module in model.named_modules() if is_quantized(module))


@dataclass(frozen=True)
class QuantFormat:
    """How one layer is quantized: enough to quantize a dense layer the same way again."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    threshold: float = 6.0

    @classmethod
    def of(cls, module: nn.Module) -> QuantFormat:
        """The format of an existing bitsandbytes layer."""
        lib = bnb()
        if isinstance(module, lib.nn.Linear4bit):
            weight = module.weight
            return cls(4, weight.quant_type, weight.compress_statistics, compute_dtype(module), weight.blocksize)
        return cls(8, threshold=module.state.threshold)

    def describe(self) -> str:
        if self.bits == 8:
            return "LLM.int8"
        return f"{self.quant_type}{' + double quantization' if self.double_quant else ''}"


def quantize_model(
    model: nn.Module,
    *,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: torch.dtype | str | None = None,
    llm_int8_threshold: float = 6.0,
    skip_modules: Sequence[str] = (),
    device: torch.device | str | None = None,
    allow_requantize: bool = False,
) -> nn.Module:
    """Replace the model's linear layers by bitsandbytes 4-bit (or 8-bit) layers, in place; returns ``model``.

    Every ``nn.Linear`` and ``Conv1D`` is quantized except the output head, task
    heads (``classifier``, ``score``, ``qa_outputs``), the model's
    ``_keep_in_fp32_modules`` and ``skip_modules`` (names or name suffixes, like
    ``modules_to_save``): the layers transformers' bitsandbytes loading
    quantizes, to the same bits. ``bnb_4bit_compute_dtype=None`` computes in
    each layer's own weight dtype. With ``device`` the layers are quantized onto
    it one by one and the rest of the model follows, so a model loaded on the
    CPU reaches the GPU already quantized.

    Raises :class:`QuantizationError` if a layer is already quantized, or holds
    merged adapter weights (from ``merge_and_unload``) and ``allow_requantize`` is
    not set: quantizing those again rounds most of the adapter's update away.
    """
    fmt = quant_format(
        load_in_8bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, llm_int8_threshold
    )
    quantize_layers(model, fmt, skip_modules, device, allow_requantize)
    if device is not None:
        model.to(device)
    return model


def quant_format(
    load_in_8bit: bool,
    bnb_4bit_quant_type: str,
    bnb_4bit_use_double_quant: bool,
    bnb_4bit_compute_dtype: torch.dtype | str | None,
    llm_int8_threshold: float,
) -> QuantFormat:
    """A :class:`QuantFormat` from ``BitsAndBytesConfig``-style options."""
    if bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {bnb_4bit_quant_type!r}")
    dtype = _dtype(bnb_4bit_compute_dtype)
    return QuantFormat(
        8 if load_in_8bit else 4, bnb_4bit_quant_type, bnb_4bit_use_double_quant, dtype, threshold=llm_int8_threshold
    )


def quantize_layers(
    model: nn.Module, fmt: QuantFormat, skip: Sequence[str], device: torch.device | str | None, allow_requantize: bool
) -> dict[str, nn.Module]:
    """Quantize the eligible layers; returns the original modules by name (to undo with :func:`restore`)."""
    lib = bnb()
    adapted = [n for n, m in model.named_modules() if getattr(m, "is_peftkit_wrapper", False)]
    if adapted:
        raise QuantizationError(
            f"the model already carries adapters ({_few(adapted)}); quantize the base model before adding any "
            f"(further QLoraConfig adapters on a quantized base take quantize=False)"
        )
    targets = _eligible_layers(model, skip)
    already = [name for name, module in targets if is_quantized(module)]
    if already:
        raise QuantizationError(
            f"{len(already)} layers are already quantized ({_few(already)}); quantizing them again is not possible. "
            f"For a model loaded with a quantization_config or passed through quantize_model, use "
            f"QLoraConfig(quantize=False) or a plain LoraConfig"
        )
    merged = [name for name, module in targets if getattr(module, MERGED_MARK, None) is not None]
    if merged and not allow_requantize:
        raise QuantizationError(
            f"{len(merged)} layers hold merged adapter weights dequantized by merge_and_unload ({_few(merged)}); "
            f"quantizing them again rounds most of the adapter's update away. Keep the dense model, or opt in with "
            f"quantize_model(..., allow_requantize=True) / peftkit_qlora.merge_and_unload(model, requantize=True)"
        )
    if targets:
        _probe(lib, fmt, device or targets[0][1].weight.device)
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in targets:
            layer_format = getattr(module, MERGED_MARK, None) or fmt
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, quantize_layer(lib, module, layer_format, device))
            originals[name] = module
    except Exception as exc:
        restore(model, originals)
        raise QuantizationError(
            f"bitsandbytes could not quantize layer {name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    return originals


def _probe(lib: ModuleType, fmt: QuantFormat, device: torch.device | str) -> None:
    """Quantize a small tensor on ``device`` once, so an unsupported platform fails with a clear message."""
    try:
        quantize_layer(lib, nn.Linear(64, 64, bias=False), fmt, device)
    except Exception as exc:
        raise BitsAndBytesUnavailableError(
            f"bitsandbytes {getattr(lib, '__version__', '?')} cannot quantize to {fmt.describe()} on {device} here "
            f"({type(exc).__name__}: {exc}); use a device it supports or reinstall it: {INSTALL_HINT}"
        ) from exc


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back modules replaced by :func:`quantize_layers`."""
    for name, module in originals.items():
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, module)


def _eligible_layers(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Every linear layer but those transformers' bitsandbytes loading also leaves alone, and ``skip``.

    Left alone: the output head, task heads (``classifier``, ``score``,
    ``qa_outputs``), layers tied to the input embeddings, and the model's
    ``_keep_in_fp32_modules`` (T5's ``wo``, whose caller casts its input to the
    layer's weight dtype).
    """
    heads = output_head_names(model)
    never = [*skip, *(h for names in TASK_HEADS.values() for h in names)]
    never += [
        *(getattr(model, "_keep_in_fp32_modules", None) or []),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or []),
    ]
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    tied = getattr(embedding, "weight", None)
    return [
        (name, module)
        for name, module in model.named_modules()
        if (is_quantized(module) or type(module) in (nn.Linear, Conv1D))
        and name not in heads
        and not name_matches(name, never)
        and (tied is None or getattr(module, "weight", None) is not tied)
    ]


def quantize_layer(
    lib: ModuleType, module: nn.Module, fmt: QuantFormat, device: torch.device | str | None = None
) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weights in ``fmt``, on ``device`` (default: where they are)."""
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.T
    out_features, in_features = weight.shape
    target = torch.device(device) if device is not None else weight.device
    bias = module.bias
    if fmt.bits == 4:
        compute = fmt.compute_dtype or weight.dtype
        layer = lib.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute,
            compress_statistics=fmt.double_quant,
            quant_type=fmt.quant_type,
            device="meta",
        )
        layer.weight = lib.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            blocksize=fmt.blocksize,
            compress_statistics=fmt.double_quant,
            quant_type=fmt.quant_type,
            module=layer,
        ).to(target)
        disable_cpu_repacking(layer)
    else:
        layer = lib.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=fmt.threshold,
            device="meta",
        )
        layer.weight = lib.nn.Int8Params(weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False).to(
            target
        )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(target), requires_grad=False)
    layer.train(module.training)
    return layer


def disable_cpu_repacking(layer: nn.Module) -> None:
    """Keep a 4-bit layer off bitsandbytes' AVX512-BF16 CPU inference path.

    On such CPUs bitsandbytes 0.50 repacks the weight on the first eval-mode
    forward: that path computes in bfloat16 whatever the compute dtype, fails for
    layers whose sizes are not multiples of 32, and its inverse (run by
    ``state_dict``) re-quantizes double-quantized scales, changing the saved
    weights. GPUs never take it.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.quant_state = layer.weight.quant_state


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes 4-bit layer computes in (8-bit layers: their bias dtype, else float32)."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None:
        return dtype
    state = getattr(module.weight, "quant_state", None)
    if state is not None and state.dtype is not None:
        return state.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else torch.float32


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight a bitsandbytes layer computes with, as float32 (or ``dtype``)."""
    lib = bnb()
    if isinstance(module, lib.nn.Linear4bit):
        disable_cpu_repacking(module)
        return lib.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype or torch.float32)
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    dense = lib.functional.int8_vectorwise_dequant(module.weight.data, scales)
    return dense if dtype is None else dense.to(dtype)


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise QuantizationError(f"unknown compute dtype {value!r}; use 'bfloat16', 'float16' or 'float32'")
    return dtype


def _few(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def clear_quantization_marks(model: nn.Module) -> None:
    """Drop transformers' "this model is quantized" markers once no bitsandbytes layer is left.

    Otherwise ``save_pretrained`` would write a ``quantization_config`` with the
    dense weights, and loading them back would silently quantize them again.
    """
    if any(True for _ in quantized_modules(model)):
        return
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model, "is_quantized", False):
        model.is_quantized = False
