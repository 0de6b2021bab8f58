"""LoRA's low-rank products with the dropout mask drawn inside them, so ``dropout(x)`` is never written.

Without them a training step with ``lora_dropout > 0`` writes the dropped
input in forward and reads it back for ``x A^T``, and in backward writes it
again (for ``A``'s gradient) beside the masked input gradient: six passes over
each adapted layer's input. Here, on CUDA:

- :func:`dropped_down_projection`: ``h = dropout(x) A^T``, one read of ``x``;
  it also writes the mask packed, one bit per element (1/16 of a 16-bit
  ``x``'s bytes), for backward;
- :func:`dropped_backward`: one read of ``x`` and of the packed mask give both
  the input gradient's low-rank term ``dropout(grad_h A)``, written for the
  base layer's input-gradient GEMM to accumulate onto (beta = 1, a read that
  costs the compute-bound GEMM little), and ``grad_A = grad_h^T dropout(x)``.

The masks are :mod:`peftkit_lora.dropout`'s (Philox keyed by seed plus the
device's salt and the element's row-major index, 16 bits per element, 8
elements per call), so either path, fused or not, drops the same elements.
Drawing them is most of the fused forward's time; backward reads the packed
copy instead of drawing them again.
"""

from __future__ import annotations

import functools

import torch

from peftkit_lora.dropout import PHILOX_ROUNDS, seed_salt
from peftkit_lora.launch import CachedLaunch, product_kernel, rank_block, triton_blocks

# (BLOCK_M, BLOCK_K, num_warps, num_stages) of each kernel
DOWN_TILE = (16, 64, 4, 3)
BACKWARD_TILE = (32, 64, 4, 3)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the 16-bit inputs the kernels serve (float32 would take TF32 products)
MAX_RANK = 64  # wider low-rank tiles would not fit the kernels' registers; the unfused path serves them
BACKWARD_PROGRAMS_PER_SM = 4  # backward programs per SM: the rows are split into chunks, each summing A's gradient over its rows


def dropped_products_apply(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the fused products serve ``x`` and LoRA's ``a``: CUDA, ``x`` 16-bit (float32 would take TF32 products), 2-D, contiguous,
    width a multiple of 8; ``a`` contiguous, in any floating dtype (the kernels round it to ``x``'s)."""
    fits = x.dim() == 2 and x.is_contiguous() and x.shape[1] % 8 == 0 and a.is_contiguous() and a.shape[0] <= MAX_RANK
    fits = fits and x.is_cuda and x.dtype in HALF_DTYPES and a.dtype in (torch.float32, x.dtype)
    return fits and product_kernel("down_kernel") is not None


def dropped_down_projection(
    x: torch.Tensor, a: torch.Tensor, p: float, seed: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scaling * dropout(x) @ a.T, keep)`` for ``x (M, K)`` and ``a (r, K)``, the mask drawn as ``seeded_dropout(x, p, seed)`` draws it.

    ``keep`` is what :func:`dropped_backward` needs, in one flat byte buffer: the packed mask (:func:`packed_mask`,
    ``(M, K / 8)`` bytes, bit ``j`` of byte ``c`` keeping element ``8 c + j`` of its row), then backward's arrival
    counters, zeroed here so that backward launches no zeroing kernel of its own.
    """
    m, k = x.shape
    r = a.shape[0]
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    counters_at, counters = _counters_layout(m, k)
    keep = torch.empty(counters_at + 4 * counters, dtype=torch.uint8, device=x.device)
    block_m, block_k, warps, stages = DOWN_TILE
    _launch("down_kernel")(
        (triton_blocks(m, block_m),), x, a, h, keep, _arrivals(keep, m, k), m, k, r, counters,
        _threshold(p), scaling / (1.0 - p), seed, seed_salt(x.device),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(r), ROUNDS=PHILOX_ROUNDS, num_warps=warps, num_stages=stages,
    )
    return h, keep


def packed_mask(keep: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """The ``(M, K / 8)`` packed mask in :func:`dropped_down_projection`'s ``keep`` for an ``(M, K)`` input."""
    return keep[: m * (k // 8)].view(m, k // 8)


def _counters_layout(m: int, k: int) -> tuple[int, int]:
    """Where backward's arrival counters start in ``keep`` (after the mask, 16-byte aligned) and how many there are:
    one per 32 columns, enough for any backward tile 32 or more columns wide."""
    return triton_blocks(m * (k // 8), 16) * 16, triton_blocks(k, 32)


def _arrivals(keep: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """The backward kernel's arrival counters in ``keep``, as int32."""
    counters_at, counters = _counters_layout(m, k)
    return keep[counters_at : counters_at + 4 * counters].view(torch.int32)


def dropped_backward(
    x: torch.Tensor,
    grad_h: torch.Tensor,
    a: torch.Tensor,
    keep: torch.Tensor,
    p: float,
    scaling: float = 1.0,
    grad_a_dtype: torch.dtype = torch.float32,
    input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(scaling * dropout(grad_h @ a), scaling * grad_h.T @ dropout(x))``, the backward of :func:`dropped_down_projection`:
    the low-rank term of the input gradient in ``x``'s dtype (``None`` without ``input_grad``), onto which the
    caller accumulates the base layer's (a GEMM with beta = 1), and ``A``'s gradient summed in float32 and written
    in ``grad_a_dtype``.

    ``x`` is ``(M, K)`` and contiguous, ``grad_h`` is ``(M, r)``, ``a`` is ``(r, K)``; ``keep`` is what
    :func:`dropped_down_projection` gave (the kernel leaves its counters zeroed again, so a second backward works).
    """
    m, k = x.shape
    r = a.shape[0]
    block_m, block_k, warps, stages = BACKWARD_TILE
    column_blocks = triton_blocks(k, block_k)
    chunks = max(1, min(triton_blocks(m, block_m), BACKWARD_PROGRAMS_PER_SM * _multiprocessors(x.device) // column_blocks))
    rows_per_chunk = triton_blocks(triton_blocks(m, chunks), block_m) * block_m
    chunks = triton_blocks(m, rows_per_chunk)
    spread = torch.empty_like(x) if input_grad else None
    partial = torch.empty(chunks, r, k, dtype=torch.float32, device=x.device)
    arrivals = _arrivals(keep, m, k)
    assert column_blocks <= arrivals.numel(), "a backward tile narrower than 32 columns needs more counters"
    grad_a = torch.empty(r, k, dtype=grad_a_dtype, device=x.device)
    _launch("backward_kernel")(  # without an input gradient, x stands in for its pointer: INPUT_GRAD=False never touches it
        (column_blocks, chunks), x, x if spread is None else spread, grad_h, a, keep, partial, arrivals, grad_a,
        m, k, r, rows_per_chunk, scaling / (1.0 - p),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(r), INPUT_GRAD=input_grad, num_warps=warps, num_stages=stages,
    )
    return spread, grad_a


def _launch(name: str) -> CachedLaunch:
    kernel = product_kernel(name)
    assert kernel is not None, "dropped_products_apply says whether Triton is there"
    return kernel


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _threshold(p: float) -> int:
    return round(p * 65536)  # as peftkit_lora.dropout: dropped when the element's 16 random bits fall below
