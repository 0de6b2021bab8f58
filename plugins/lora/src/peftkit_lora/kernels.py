"""The fast LoRA linear: one autograd function for ``x W^T + b + s * B A dropout(x)``.

What it saves against the plain composition of modules (Hugging Face PEFT's):

- no dropout copy of ``x``: the dropout mask is regenerated in backward from
  a seed drawn on the host, so neither the mask nor ``dropout(x)`` is stored;
- no ``(N, out)`` temporaries for the scaled LoRA output and the sum: the
  low-rank product is accumulated into the base output in place (``addmm_``),
  with the scale folded into the ``(N, r)`` intermediate;
- backward stores only ``x`` (which q/k/v share) and the ``(N, r)`` product
  ``h``, and adds the LoRA input gradient into the base input gradient in place.

It computes the same function as the plain path (same dropout semantics:
dropout on the LoRA input, scaled by ``1 / (1 - p)``), which the tests check
against a float64 reference with ``gradcheck``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask, already scaled by ``1 / (1 - p)``, that ``seed`` gives for a tensor like ``like``."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))


def draw_seed() -> int:
    """A seed from torch's global CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2**62, (1,)).item())


class LoraLinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias) + scaling * (dropout(x) @ lora_a.T) @ lora_b.T`` with a lean backward.

    ``weight`` and ``bias`` are the frozen base parameters (no gradient);
    ``weight`` is in ``nn.Linear`` layout ``(out, in)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: int,
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        flat_x = x.reshape(-1, x.shape[-1])
        lora_in = flat_x * dropout_mask(flat_x, dropout_p, seed) if dropout_p > 0 else flat_x
        h = (lora_in @ lora_a.T).mul_(scaling)
        out.view(-1, out.shape[-1]).addmm_(h, lora_b.T)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        grad_h = (flat_grad @ lora_b).mul_(ctx.scaling)  # (N, r)
        grad_b = flat_grad.T @ h  # h already carries the scale
        mask = dropout_mask(flat_x, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0 else None
        grad_a = grad_h.T @ (flat_x * mask if mask is not None else flat_x)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad @ weight
            if mask is None:
                grad_x.addmm_(grad_h, lora_a)
            else:
                grad_x.add_((grad_h @ lora_a).mul_(mask))
            grad_x = grad_x.view_as(x)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> torch.Tensor:
    """The fused LoRA linear; without autograd it runs the same in-place forward with no saved state."""
    seed = draw_seed() if dropout_p > 0 else 0
    if torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    with torch.no_grad():
        return LoraLinearFunction.forward(_NoContext(), x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


class _NoContext:
    """Stands in for autograd's ctx when the forward runs without autograd."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass
