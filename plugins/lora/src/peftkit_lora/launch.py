"""Launching a Triton kernel for less host time than ``kernel[grid](...)`` costs.

A training step over a 4-bit model launches a few thousand small kernels and
waits on the host, not the GPU. Triton's ``kernel[grid](*args)`` binds the
arguments and computes its specialization key in Python on every call: 30
to 90 microseconds on the hosts measured, where the launch itself takes a
few. :class:`CachedLaunch` keeps the compiled kernel that a first call
returns under a key of what Triton specializes on (each tensor's dtype and
device, each integer's width, whether it is 1 and whether it divides by 16,
the compile-time constants) and launches it directly on later calls with the
same key. Tensors not aligned to 16 bytes, other argument types and Triton's
CPU interpreter take the ordinary path every time.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class CachedLaunch:
    """``CachedLaunch(kernel)(grid, *args, **constexprs)`` runs ``kernel[grid](*args, **constexprs)``.

    Compile-time constants go as keywords, in the kernel's parameter order,
    after all the other arguments; the launch options ``num_warps`` and
    ``num_stages`` may follow them.
    """

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self._compiled: dict[tuple[Any, ...], Any] = {}

    def __call__(self, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        options = {name: constexprs.pop(name) for name in _LAUNCH_OPTIONS if name in constexprs}
        key = _specialization(args, {**constexprs, **options})
        compiled = None if key is None else self._compiled.get(key)
        if compiled is not None:
            compiled[(*grid, 1, 1)[:3]](*args, *constexprs.values())  # a compiled kernel takes all three grid sizes
            return
        result = self._kernel[grid](*args, **constexprs, **options)
        if key is not None and hasattr(result, "packed_metadata"):  # a compiled kernel (the interpreter returns none)
            self._compiled[key] = result


@functools.cache
def product_kernel(name: str) -> CachedLaunch | None:
    """The kernel ``name`` of :mod:`peftkit_lora._product_kernels` behind a :class:`CachedLaunch`; ``None`` without Triton."""
    try:
        from peftkit_lora import _product_kernels
    except ImportError:
        return None
    return CachedLaunch(getattr(_product_kernels, name))


def triton_blocks(n: int, block: int) -> int:
    """How many blocks of ``block`` cover ``n``."""
    return (n + block - 1) // block


def rank_block(r: int) -> int:
    """The rank padded for ``tl.dot``: a power of two, 16 or more."""
    return max(16, 1 << (r - 1).bit_length())


def _specialization(args: tuple[Any, ...], constexprs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What Triton compiles a separate kernel for, or ``None`` where the ordinary launch should decide."""
    key: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.data_ptr() % 16:
                return None
            key.append((arg.dtype, arg.device))
        elif isinstance(arg, bool):
            key.append(("bool", arg))
        elif isinstance(arg, int):
            width = 32 if -(2**31) <= arg < 2**31 else 64 if -(2**63) <= arg < 2**63 else 0  # i32, i64, u64
            key.append(("int", width, arg == 1, arg % 16 == 0))
        elif isinstance(arg, float):
            key.append("float")
        else:
            return None
    return (*key, *constexprs.items())
