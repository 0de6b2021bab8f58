"""Microbenchmarks of the fast LoRA path's pieces on a GPU: dropout-fused products, per-call merge, one LoRA linear, mixed batches.

Each line gives GPU time (a CUDA graph of 20 calls, replayed: no host time in it)
and host time per eager call, so
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

from peftkit_lora import dropout_products, kernels
from peftkit_lora.dropout import seeded_dropout, seeded_dropout_pair
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


def measure(name: str, fn: Callable[[], object], steps: int = 20) -> None:
    """GPU time per call from a CUDA graph of ``steps`` calls (no host time in it), and host time per eager call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - began) / steps * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / steps)
    print(f"{name:>58}: GPU {statistics.median(times):8.1f} us   host {host:7.1f} us", flush=True)


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


def dropout_products_shape(n: int, d_in: int) -> None:
    """The dropout-fused low-rank products against dropout in its own passes, over tile shapes."""
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(n, d_in, **bf16)
    a = torch.randn(16, d_in, **bf16) * 0.02
    grad_h = torch.randn(n, 16, **bf16)
    grad_x = torch.randn(n, d_in, **bf16)
    measure(f"down, dropout pass + mm {n}x{d_in}", lambda: seeded_dropout(x, 0.05, 7) @ a.T)
    measure(f"down, no dropout (mm) {n}x{d_in}", lambda: x @ a.T)
    defaults = dropout_products.DOWN_TILE, dropout_products.BACKWARD_TILE, dropout_products.BACKWARD_PROGRAMS_PER_SM
    for tile in ((16, 64, 4, 3), (16, 128, 4, 4), (16, 128, 2, 4), (16, 256, 4, 4), (16, 256, 8, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4)):
        dropout_products.DOWN_TILE = tile
        measure(f"down, fused {tile} {n}x{d_in}", lambda: dropout_products.dropped_down_projection(x, a, 0.05, 7, 2.0))

    def two_pass() -> None:
        spread = grad_h @ a
        dropped, spread = seeded_dropout_pair(x, spread, 0.05, 7)
        grad_h.T @ dropped
        grad_x.add_(spread)  # what the base GEMM's beta = 1 read costs, roughly

    measure(f"backward, pair kernel + mms {n}x{d_in}", two_pass)
    measure(f"backward, no dropout: grad_h a, grad_h^T x {n}x{d_in}", lambda: (grad_h @ a, grad_h.T @ x))
    dropout_products.DOWN_TILE = defaults[0]
    _, keep = dropout_products.dropped_down_projection(x, a, 0.05, 7)
    for tile in ((32, 64, 4, 3), (16, 64, 2, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3)):
        for per_sm in (2, 4, 8, 16):
            dropout_products.BACKWARD_TILE, dropout_products.BACKWARD_PROGRAMS_PER_SM = tile, per_sm
            measure(
                f"backward, fused {tile} {per_sm}/SM {n}x{d_in}",
                lambda: dropout_products.dropped_backward(x, grad_h, a, keep, 0.05, 2.0),
            )
    # the later measurements (one LoRA linear) run with the library's own tiles
    dropout_products.DOWN_TILE, dropout_products.BACKWARD_TILE, dropout_products.BACKWARD_PROGRAMS_PER_SM = defaults


def merged_forward_shape(n: int, d_in: int, d_out: int) -> None:
    """No-grad LoRA linear: a per-call merged weight against the two low-rank products."""
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(n, d_in, **bf16)
    w = torch.randn(d_out, d_in, **bf16) * 0.02
    a = torch.randn(16, d_in, **bf16) * 0.02
    b = torch.randn(d_out, 16, **bf16) * 0.02
    with torch.no_grad():
        measure(f"no-grad base {n}x{d_in}->{d_out}", lambda: x @ w.T)
        measure(f"merge alone, cuBLAS addmm {d_in}->{d_out}", lambda: torch.addmm(w, b, a))
        for tile in ((64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (32, 256, 4, 3), (16, 256, 4, 2)):
            kernels.MERGE_TILE = tile
            measure(f"merge alone, Triton {tile} {d_in}->{d_out}", lambda: kernels.merged_weight(w, b, a))
        kernels.MERGE_TILE = (64, 128, 4, 3)
        measure(f"no-grad LoRA, merged per call {n}x{d_in}->{d_out}", lambda: kernels._merged_forward(x, w, None, a, b, 2.0))
        measure(f"no-grad LoRA, two products {n}x{d_in}->{d_out}", lambda: kernels.lora_forward(x, w, None, a, b, 2.0, 0.0, 0)[0])


def main() -> None:
    torch.manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    for shape in ((4096, 2048, 2048), (4096, 2048, 256), (4096, 2048, 5632), (4096, 5632, 2048)):
        merged_forward_shape(*shape)
    for d_in in (2048, 5632):
        dropout_products_shape(8192, d_in)
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
