"""The fast LoRA linear: one autograd function for ``x W^T + b + s * B A dropout(x)``.

What it saves against the plain composition of modules (Hugging Face PEFT's):

- no dropout copy of ``x`` is kept: the mask is regenerated in backward from
  a seed (see :mod:`peftkit_lora.dropout`), so neither it nor ``dropout(x)``
  is stored;
- no ``(N, out)`` temporaries for the scaled LoRA output and the sum: the
  low-rank product is written first and the base matmul accumulates onto it
  (``addmm_`` with beta = 1 reads it inside the compute-bound base GEMM), with
  the scale folded into ``B`` (one small kernel that also casts it); backward
  does the same for the input gradient;
- backward stores only ``x`` (which q/k/v share) and the ``(N, r)`` product ``h``.

It computes the same function as the plain path (dropout on the LoRA input,
kept values scaled by ``1 / (1 - p)``), which the tests check against a
float64 reference with ``gradcheck``.

A base weight that is stored packed (QLoRA's 4-bit layers) comes in as a
``weight_slices`` callable instead, giving the dense weight a slice of rows at
a time: it is rebuilt in forward and again in backward and never kept whole,
each slice dropped once its rows of the product are done. LoRA
weights in another dtype than ``x`` (float32 master weights over a bf16
model) are cast inside, and their gradients come back in their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from peftkit_lora.dropout import draw_seed, seeded_dropout, seeded_dropout_pair

# Row slices ``(rows, dense)`` of a packed base weight, built one at a time as the iterable is advanced.
WeightSlices = Callable[[], Iterable[tuple[slice, torch.Tensor]]]


class LoraLinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias) + scaling * (dropout(x) @ lora_a.T) @ lora_b.T`` with a lean backward.

    ``weight`` and ``bias`` are the frozen base parameters (no gradient);
    ``weight`` is in ``nn.Linear`` layout ``(out, in)``, or ``None`` with
    ``weight_slices`` giving it on demand.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: int,
        weight_slices: WeightSlices | None = None,
    ) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        lora_in = seeded_dropout(flat_x, dropout_p, seed) if dropout_p > 0 else flat_x
        a = lora_a.to(x.dtype)
        b = _scaled(lora_b, scaling, x.dtype)
        h = lora_in @ a.T
        del lora_in  # the dropped copy of x is not kept, nor alive while a packed weight is rebuilt
        out = torch.addmm(bias.to(x.dtype), h, b.T) if bias is not None else h @ b.T
        if weight_slices is None:
            out.addmm_(flat_x, weight.T)
        else:
            for rows, dense in weight_slices():
                out[:, rows].addmm_(flat_x, dense.T)
                del dense  # a packed weight's slice is freed before the next one is built
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.weight_slices = scaling, dropout_p, seed, weight_slices
        ctx.lora_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, h = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        grad_h = flat_grad @ b  # (N, r); b carries the scale
        a_dtype, b_dtype = ctx.lora_dtypes
        grad_b = _scaled(flat_grad.T @ h, ctx.scaling, b_dtype)
        p, seed = ctx.dropout_p, ctx.seed
        grad_x = grad_h @ a if ctx.needs_input_grad[0] else None
        lora_in = flat_x
        if p > 0 and grad_x is not None:  # the same mask for the input and its gradient, drawn once
            lora_in, grad_x = seeded_dropout_pair(flat_x, grad_x, p, seed)
        elif p > 0:
            lora_in = seeded_dropout(flat_x, p, seed)
        grad_a = grad_h.T @ lora_in
        del lora_in
        if grad_x is not None and ctx.weight_slices is None:
            grad_x = grad_x.addmm_(flat_grad, weight).view_as(x)
        elif grad_x is not None:
            for rows, dense in ctx.weight_slices():
                grad_x.addmm_(flat_grad[:, rows], dense)
                del dense
            grad_x = grad_x.view_as(x)
        return grad_x, None, None, grad_a.to(a_dtype), grad_b, None, None, None, None


def _scaled(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * t`` in ``dtype``: one kernel for the product and the cast, none when there is nothing to do."""
    if t.dtype == dtype:
        return t if scale == 1.0 else t * scale
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    weight_slices: WeightSlices | None = None,
) -> torch.Tensor:
    """The fused LoRA linear; without autograd it runs the same forward and saves nothing."""
    seed = draw_seed() if dropout_p > 0 else 0
    args = (x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, weight_slices)
    if torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        return LoraLinearFunction.apply(*args)
    with torch.no_grad():
        return LoraLinearFunction.forward(_NoContext(), *args)


class _NoContext:
    """Stands in for autograd's ctx when the forward runs without autograd."""

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        pass
