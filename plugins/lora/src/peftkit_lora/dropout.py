"""Dropout whose mask is a function of a seed, so backward can regenerate it instead of storing it.

On CUDA with Triton available, one fused kernel draws the mask and applies it
(Philox counter-based random numbers keyed by the seed and the element index);
elsewhere torch's generator does the same job in two passes. Either way the
same seed and shape give the same mask, and kept elements are scaled by
``1 / (1 - p)``.
"""

from __future__ import annotations

import functools

import torch


def draw_seed() -> int:
    """A seed from torch's global CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def seeded_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``t`` with the seed's dropout mask applied (a new tensor)."""
    if t.is_cuda and t.is_contiguous() and _triton_kernel() is not None:
        return _triton_dropout(t, p, seed)
    return t * _torch_mask(t, p, seed)


def _torch_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))


@functools.cache
def _triton_kernel():  # type: ignore[no-untyped-def]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dropout_kernel(src, dst, n, p, scale, seed, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        values = tl.load(src + offsets, mask=inside)
        keep = tl.rand(seed, offsets) > p
        tl.store(dst + offsets, tl.where(keep, values * scale, 0.0).to(values.dtype), mask=inside)

    return dropout_kernel


def _triton_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    out = torch.empty_like(t)
    n = t.numel()
    block = 4096
    _triton_kernel()[((n + block - 1) // block,)](t, out, n, p, 1.0 / (1.0 - p), seed, BLOCK=block)
    return out
