"""Microbenchmarks of the fast LoRA path's pieces on a GPU: one LoRA linear, the dropout kernel, mixed-batch layers.

Each line gives GPU time (CUDA events, median) and host time per call, so
that a regression in benchmarks/gpu_lora.py can be traced to a kernel or to
host overhead.

    python benchmarks/lora_micro.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from peftkit_lora.dropout import seeded_dropout
from peftkit_lora.kernels import LoraLinearFunction


@triton.jit
def per_element_philox_dropout(src, dst, n, p, scale, seed, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """The previous kernel: one full Philox (tl.rand) per element, for comparison."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    values = tl.load(src + offsets, mask=inside)
    keep = tl.rand(seed, offsets) > p
    tl.store(dst + offsets, tl.where(keep, values * scale, 0.0).to(values.dtype), mask=inside)


def old_dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    out = torch.empty_like(t)
    n = t.numel()
    per_element_philox_dropout[((n + 4095) // 4096,)](t, out, n, p, 1 / (1 - p), seed, BLOCK=4096)
    return out


def measure(name: str, fn: Callable[[], object], steps: int = 50) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    gpu = []
    began = time.perf_counter()
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        gpu.append((start, end))
    host = (time.perf_counter() - began) / steps * 1e6
    torch.cuda.synchronize()
    gpu_us = statistics.median(s.elapsed_time(e) for s, e in gpu) * 1000
    print(f"{name:>58}: GPU {gpu_us:8.1f} us   host {host:7.1f} us")


def one_shape(n: int, d_in: int, d_out: int) -> None:
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(n, d_in, **bf16)
    measure(f"copy {n}x{d_in}", lambda: x.clone())
    measure(f"dropout, 8 elements per Philox {n}x{d_in}", lambda: seeded_dropout(x, 0.05, 7))
    measure(f"dropout, Philox per element {n}x{d_in}", lambda: old_dropout(x, 0.05, 7))
    w = torch.randn(d_out, d_in, **bf16) * 0.02
    a = (torch.randn(16, d_in, **bf16) * 0.02).requires_grad_(True)
    b = (torch.randn(d_out, 16, **bf16) * 0.02).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(n, d_out, **bf16)
    for p in (0.0, 0.05):
        measure(
            f"LoRA linear fwd+bwd {n}x{d_in}->{d_out} p={p}",
            lambda p=p: torch.autograd.backward(LoraLinearFunction.apply(xg, w, None, a, b, 2.0, p, 7), g),
        )
    measure(f"base linear fwd+bwd {n}x{d_in}->{d_out}", lambda: torch.autograd.backward(xg @ w.T, g))


def main() -> None:
    torch.manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    for shape in ((8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048)):
        one_shape(*shape)
    x = torch.randn(8, 512, 2048, **bf16)
    w = torch.randn(2048, 2048, **bf16) * 0.02
    a_cat = torch.randn(64, 2048, **bf16) * 0.02
    b_cat = torch.randn(2048, 64, **bf16) * 0.02
    mask = (torch.arange(64, device="cuda")[None, :] // 16 == torch.arange(8, device="cuda")[:, None] % 4).to(torch.bfloat16).unsqueeze(1)
    a_rows = torch.randn(8, 16, 2048, **bf16) * 0.02
    b_rows = torch.randn(8, 2048, 16, **bf16) * 0.02
    with torch.no_grad():
        measure("base forward 4096x2048->2048", lambda: x @ w.T)

        def concatenated() -> None:
            out = x @ w.T
            h = x @ a_cat.T
            h.mul_(mask)
            out.view(-1, 2048).addmm_(h.view(-1, 64), b_cat.T)

        def gathered() -> None:
            out = x @ w.T
            torch.baddbmm(out, torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))

        measure("mixed 4 adapters, concatenated A (one mm)", concatenated)
        measure("mixed 4 adapters, per-row gathered A (bmm)", gathered)


if __name__ == "__main__":
    main()
