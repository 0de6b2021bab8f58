"""The fused 4-bit LoRA layer as a ``torch.library`` custom op, so that ``torch.compile`` keeps it whole.

Traced by the compiler, the layer's plain path rebuilds the whole dense
weight (bitsandbytes' ``dequantize_4bit``) and the compiler keeps what it
likes for backward. As an opaque op the compiled code runs peftkit's eager
fused layer unchanged: the weight rebuilt a slice of rows at a time in
forward and again in backward, the dropout mask regenerated from a seed, and
only the input and the ``(N, r)`` LoRA intermediate saved. The compiler fuses
everything around it (norms, rotary embeddings, activations), which is what
:func:`peftkit_qlora.compile_blocks` is for.

The seed is drawn inside the op from torch's CPU generator and returned as a
tensor for backward, so gradient checkpointing's recomputation (which
restores the generator) draws the same one.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from peftkit_lora.dropout import draw_seed
from peftkit_lora.kernels import lora_backward, lora_forward
from peftkit_qlora.dequant import dense_row_slices
from peftkit_qlora.quantize import bnb


def lora_4bit_linear(
    x: Tensor, weight: Any, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout_p: float
) -> Tensor:
    """``x W^T + b + scaling * B A dropout(x)`` for a bitsandbytes 4-bit ``weight`` (``Params4bit``), for compiled code.

    The LoRA weights are cast (and ``B`` scaled) outside the ops, where the
    compiler fuses those small steps and their gradients' casts back.
    """
    state = weight.quant_state
    nested = state.state2 if state.nested else None
    quant = (
        weight.data, state.absmax, state.code,
        None if nested is None else nested.absmax, None if nested is None else nested.code, None if nested is None else state.offset,
        state.blocksize, 0 if nested is None else nested.blocksize, state.quant_type, state.shape[0],
    )
    a, b = lora_a.to(x.dtype), (lora_b * scaling).to(x.dtype)
    return _Lora4bitLinear.apply(x, bias, a, b, dropout_p, *quant)


class _Lora4bitLinear(torch.autograd.Function):
    """Autograd for the two ops; ``torch.compile`` traces it into its forward and backward graphs."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, dropout_p: float, *quant: Any) -> Tensor:  # type: ignore[override]
        out, h, seed = torch.ops.peftkit_qlora.lora_4bit_linear(x, bias, a, b, dropout_p, *quant)
        ctx.save_for_backward(x, h, seed, a, b, *quant[:6])
        ctx.dropout_p, ctx.constants = dropout_p, quant[6:]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, h, seed, a, b, *tensors = ctx.saved_tensors
        grad_x, grad_a, grad_b = torch.ops.peftkit_qlora.lora_4bit_linear_backward(
            grad_out, x, h, seed, a, b, ctx.dropout_p, *tensors, *ctx.constants
        )
        return (grad_x, None, grad_a, grad_b, None, *[None] * 10)


@torch.library.custom_op("peftkit_qlora::lora_4bit_linear", mutates_args=())
def _forward(
    x: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, dropout_p: float,
    packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
    blocksize: int, blocksize2: int, quant_type: str, out_features: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, h, seed)``: the layer's output, the LoRA intermediate and the dropout seed, both kept for backward.

    ``a`` and ``b`` are the LoRA weights in ``x``'s dtype, ``b`` scaled.
    """
    seed = draw_seed() if dropout_p > 0 else 0
    state = _quant_state(absmax, code, absmax2, code2, offset, blocksize, blocksize2, quant_type, out_features, x)
    slices = functools.partial(dense_row_slices, packed, state, x.dtype)
    out, _, _, h = lora_forward(x, None, bias, a, b, 1.0, dropout_p, seed, slices)
    return out, h, torch.tensor(seed)


@_forward.register_fake
def _(x: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, dropout_p: float, *quant: Any) -> tuple[Tensor, Tensor, Tensor]:
    rows = math.prod(x.shape[:-1])
    out_features = quant[-1]
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(rows, a.shape[0]), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("peftkit_qlora::lora_4bit_linear_backward", mutates_args=())
def _backward(
    grad_out: Tensor, x: Tensor, h: Tensor, seed: Tensor, a: Tensor, b: Tensor, dropout_p: float,
    packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
    blocksize: int, blocksize2: int, quant_type: str, out_features: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_a, grad_b)``, the LoRA gradients in ``x``'s dtype."""
    state = _quant_state(absmax, code, absmax2, code2, offset, blocksize, blocksize2, quant_type, out_features, x)
    slices = functools.partial(dense_row_slices, packed, state, x.dtype)
    grad_x, grad_a, grad_b = lora_backward(grad_out, x, None, a, b, h, 1.0, dropout_p, int(seed), slices, True, (a.dtype, b.dtype))
    assert grad_x is not None
    return grad_x, grad_a, grad_b


@_backward.register_fake
def _(grad_out: Tensor, x: Tensor, h: Tensor, seed: Tensor, a: Tensor, b: Tensor, dropout_p: float, *quant: Any) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)


def _quant_state(
    absmax: Tensor, code: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
    blocksize: int, blocksize2: int, quant_type: str, out_features: int, x: Tensor,
) -> Any:
    """A bitsandbytes ``QuantState`` put back together from the op's arguments."""
    functional = bnb().functional
    state2 = None if absmax2 is None else functional.QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32)
    shape = torch.Size((out_features, x.shape[-1]))
    return functional.QuantState(absmax, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type,
                                 dtype=x.dtype, offset=offset, state2=state2)
