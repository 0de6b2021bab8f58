"""Rebuilding the dense weight of a bitsandbytes 4-bit layer, a slice of rows at a time.

The fused QLoRA layer needs the dense weight for one matmul in forward and
one in backward, then drops it. Two things make bitsandbytes' own
``dequantize_4bit`` costly there:

- with double quantization it is three launches (the 8-bit block scales,
  their offset, then the weight) behind Python argument checking: about
  110 microseconds of host time, three times per layer per training step,
  and a 4-bit training step is bound by host time, not by the GPU;
- it builds the whole matrix at once (88 MiB for a 4096 x 11008 bf16 weight),
  which sits on top of the activations at the peak of the step.

On CUDA with Triton, :func:`dense_row_slices` runs one kernel per slice that
reads the packed 4-bit codes, the block scales (8-bit with their own scales
and offset under double quantization, or float32) and the code table, and
writes the dense rows; slices are capped at :data:`SLICE_BYTES`. Elsewhere
the whole matrix comes from bitsandbytes, handed out in the same slices. Both compute
``code[nibble] * scale`` in float32 and round once to the output dtype, as
bitsandbytes does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import torch

from peftkit_lora.launch import CachedLaunch
from peftkit_qlora.quantize import bnb

# Largest dense slice built at once: a 4096 x 4096 bf16 weight is one slice; a 4096 x 11008 one is three.
SLICE_BYTES = 32 * 2**20


def dense_row_slices(packed: torch.Tensor, state: Any, dtype: torch.dtype, max_bytes: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, dense)`` pairs covering a 4-bit weight, ``dense`` being those rows in ``dtype``.

    ``packed`` and ``state`` are a ``Params4bit``'s data and ``quant_state``.
    Slices hold at most ``max_bytes`` (default :data:`SLICE_BYTES`). On CUDA
    each is built when the iterator is advanced: drop it before asking for
    the next to keep one alive at a time. Elsewhere they are views of the
    whole matrix, dequantized once by bitsandbytes.
    """
    out_features, in_features = state.shape
    row_bytes = in_features * torch.finfo(dtype).bits // 8
    rows_per_slice = max(1, (max_bytes or SLICE_BYTES) // row_bytes)
    count = -(-out_features // rows_per_slice)
    rows_per_slice = -(-out_features // count)  # even slices: 11008 rows in 3 x 3670, not 2 x 4096 + 2816
    kernel = _kernel_for(packed, state)
    whole = None
    if kernel is None:
        whole = bnb().functional.dequantize_4bit(packed, state).to(dtype)
    for start in range(0, out_features, rows_per_slice):
        rows = slice(start, min(start + rows_per_slice, out_features))
        yield rows, whole[rows] if whole is not None else _dequantize(kernel, packed, state, dtype, rows, in_features)


def _kernel_for(packed: torch.Tensor, state: Any) -> Any:
    """The Triton kernel where it runs on ``packed``: CUDA, or Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if getattr(state, "packing_format_for_cpu", False):
        return None  # bitsandbytes' CPU layout, not the packed codes the kernel reads
    if packed.is_cuda or (packed.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return _triton_kernel()
    return None


def _dequantize(kernel: Any, packed: torch.Tensor, state: Any, dtype: torch.dtype, rows: slice, in_features: int) -> torch.Tensor:
    out = torch.empty(rows.stop - rows.start, in_features, dtype=dtype, device=packed.device)
    n = out.numel()
    block = 2048
    nested = state.nested
    # Without double quantization the nested arguments are unused; any tensor stands in for them.
    scales2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.absmax
    blocksize2 = state.state2.blocksize if nested else 1
    kernel(
        (-(-n // block),), packed, state.absmax, state.code, scales2, code2, offset, out, rows.start * in_features, n,
        BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK=block,
    )
    return out


@functools.cache
def _triton_kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequantize_4bit_kernel(packed, scales, code, scales2, code2, offset, out, start, n, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = local < n
        index = start + local  # the element's index in the whole (row-major) weight
        byte = tl.load(packed + index // 2, mask=inside, other=0)
        nibble = tl.where(index % 2 == 0, byte >> 4, byte & 15).to(tl.int32)  # two codes per byte, high first
        value = tl.load(code + nibble)
        block = index // BLOCKSIZE
        if NESTED:  # the block scales are 8-bit codes with their own float32 scale per BLOCKSIZE2 blocks, plus an offset
            scale_code = tl.load(scales + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + scale_code) * tl.load(scales2 + block // BLOCKSIZE2, mask=inside, other=0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(scales + block, mask=inside, other=0.0)
        tl.store(out + local, (value * scale).to(out.dtype.element_ty), mask=inside)

    return CachedLaunch(dequantize_4bit_kernel)
