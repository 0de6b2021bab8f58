"""Dropout whose mask is a function of a seed, so backward can regenerate it instead of storing it.

On CUDA with Triton available, one fused kernel draws the mask and applies it:
Philox counter-based random numbers keyed by the seed and the element's
row-major index, one Philox call (four 32-bit words) for every 8 elements, 16
bits each, so ``p`` takes effect rounded to a multiple of 1/65536. Philox runs
:data:`PHILOX_ROUNDS` = 7 rounds, not cuRAND's 10: 7 is the fewest with which
its authors found Philox4x32 to pass TestU01's batteries (Salmon et al., SC'11;
10 is their safety margin), ample for a dropout mask, and this arithmetic is
most of the fused products' time. Drawing a
full Philox per element (``tl.rand``) made the mask cost about four times
the memory traffic of the pass. Elsewhere torch's generator does the same job
in two passes. Either way the same seed and shape give the same mask, and kept
elements are scaled by ``1 / (1 - p)`` (in float32).

The CUDA kernel also reads a per-device *salt* from GPU memory (see
:func:`seed_salt`), added to the seed before drawing: zero unless a CUDA
graph advances it. A graph replays the seeds its capture drew on the host,
so :class:`peftkit_lora.GraphedTrainingStep` adds ``1 << 32`` to the salt at
the start of each replay: every replay then draws fresh masks (Philox keyed
by the replay count in the seed's high word and the host seed in its low
word), and a checkpointed block's recomputation still draws its forward's.
"""

from __future__ import annotations

import functools
from typing import overload

import torch

from peftkit_lora.launch import CachedLaunch

PHILOX_ROUNDS = 7
_salts: dict[torch.device, torch.Tensor] = {}


def seed_salt(device: torch.device) -> torch.Tensor:
    """The device's dropout seed salt: one int64 in GPU memory, added to every seed the CUDA kernel draws with."""
    salt = _salts.get(device)
    if salt is None:
        salt = _salts[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return salt


def draw_seed() -> int:
    """A seed from torch's global CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def seeded_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``t`` with the seed's dropout mask applied (a new tensor)."""
    if t.is_cuda and _triton_kernel() is not None:
        return _triton_dropout(t.contiguous(), p, seed)  # the mask follows the logical (row-major) index
    return t * _torch_mask(t, p, seed)


def seeded_dropout_pair(x: torch.Tensor, t: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with the seed's mask applied (a new tensor), and ``t`` (same shape, contiguous) masked alike in place.

    The LoRA backward needs the dropped input (for ``A``'s gradient) and the
    input gradient masked alike; on CUDA one kernel draws the mask once for
    both. Masking the gradient where it lies spares a third buffer of the
    input's size at the backward pass's peak.
    """
    if x.shape != t.shape or not t.is_contiguous():
        raise ValueError(f"seeded_dropout_pair needs a contiguous t shaped as x, got {tuple(x.shape)} and {tuple(t.shape)}")
    if x.is_cuda and _triton_kernel() is not None:
        return _triton_dropout(x.contiguous(), p, seed, t)
    mask = _torch_mask(x, p, seed)
    return x * mask, t.mul_(mask.to(t.dtype))


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

    # a seed that happens to divide by 16 must not compile a second kernel in the middle of training
    @triton.jit(do_not_specialize=["seed"])
    def dropout_kernel(  # type: ignore[no-untyped-def]
        src, dst, src2, dst2, n, threshold, scale, seed, salt, PAIR: tl.constexpr, BLOCK: tl.constexpr, ROUNDS: tl.constexpr
    ):
        groups = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # 8 elements per Philox call
        r0, r1, r2, r3 = tl.randint4x(seed + tl.load(salt), groups, ROUNDS)
        lane = tl.arange(0, 8)[None, :]
        word = tl.where(lane < 2, r0[:, None], tl.where(lane < 4, r1[:, None], tl.where(lane < 6, r2[:, None], r3[:, None])))
        bits = tl.where(lane % 2 == 0, word, word >> 16) & 0xFFFF
        offsets = groups[:, None] * 8 + lane
        inside = offsets < n
        keep = bits >= threshold
        values = tl.load(src + offsets, mask=inside)
        tl.store(dst + offsets, tl.where(keep, values.to(tl.float32) * scale, 0.0).to(values.dtype), mask=inside)
        if PAIR:  # a second tensor under the same mask, in place
            others = tl.load(src2 + offsets, mask=inside)
            tl.store(dst2 + offsets, tl.where(keep, others.to(tl.float32) * scale, 0.0).to(others.dtype), mask=inside)

    return CachedLaunch(dropout_kernel)


@overload
def _triton_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor: ...
@overload
def _triton_dropout(t: torch.Tensor, p: float, seed: int, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
def _triton_dropout(
    t: torch.Tensor, p: float, seed: int, other: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(t)
    other_out = out if other is None else other  # the second tensor is masked in place
    n = t.numel()
    block = 4096
    threshold = round(p * 65536)  # an element is dropped when its 16 random bits fall below this
    grid = ((n + block - 1) // block,)
    second = t if other is None else other
    salt = seed_salt(t.device)
    _triton_kernel()(grid, t, out, second, other_out, n, threshold, 1.0 / (1.0 - p), seed, salt, PAIR=other is not None, BLOCK=block, ROUNDS=PHILOX_ROUNDS)
    return out if other is None else (out, other_out)
