"""Dropout drawn inside LoRA's low-rank products (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit_lora import dropout, dropout_products, kernels, launch
from peftkit_lora.kernels import LoraLinearFunction

triton_runs = launch.product_kernel("down_kernel") is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not triton_runs, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused products serve CUDA tensors")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float16  # the interpreter's dot has no bf16


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def mask_of(rows: int, cols: int, p: float, seed: int) -> torch.Tensor:
    """The standalone dropout kernel's mask (kept elements scaled), in float64: what the fused products must apply."""
    return dropout._triton_dropout(torch.ones(rows, cols, device=DEVICE), p, seed).double()


@needs_triton
@pytest.mark.parametrize(("rows", "cols", "rank", "p", "a_dtype"), [(70, 96, 8, 0.3, DTYPE), (130, 200, 12, 0.5, torch.float32), (64, 128, 16, 0.05, DTYPE)])
def test_down_projection_applies_the_dropout_kernels_mask(rows: int, cols: int, rank: int, p: float, a_dtype: torch.dtype) -> None:
    """``h = scaling * dropout(x) A^T``; float32 LoRA weights are read as they are and rounded in the kernel."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)
    a = torch.randn(rank, cols, device=DEVICE, dtype=a_dtype) * 0.1
    h, keep = dropout_products.dropped_down_projection(x, a, p, seed=17, scaling=1.5)
    mask = mask_of(rows, cols, p, 17)
    want = 1.5 * (x.double() * mask) @ a.to(DTYPE).double().T
    assert h.shape == (rows, rank) and h.dtype == DTYPE
    assert relative_error(h, want) < 5e-3
    packed = dropout_products.packed_mask(keep, rows, cols)
    assert packed.shape == (rows, cols // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpacked(packed), mask != 0), "the packed mask is the mask applied, bit j of byte c for element 8c + j"


def unpacked(keep: torch.Tensor) -> torch.Tensor:
    bits = (keep.long()[:, :, None] >> torch.arange(8, device=keep.device)) & 1
    return bits.reshape(keep.shape[0], -1) != 0


@needs_triton
@pytest.mark.parametrize(
    ("rows", "cols", "rank", "p", "a_dtype", "input_grad"),
    [(70, 96, 8, 0.3, DTYPE, True), (300, 136, 16, 0.1, torch.float32, True), (130, 200, 12, 0.5, torch.float32, False), (2000, 64, 16, 0.1, DTYPE, True)],
)
def test_backward_gives_the_masked_input_gradient_term_and_a_gradient_of_a(
    rows: int, cols: int, rank: int, p: float, a_dtype: torch.dtype, input_grad: bool
) -> None:
    """Without an input gradient (the first adapted layer) the kernel gives ``A``'s gradient alone; it is summed over
    the chunks of rows in float32 and written in ``A``'s dtype."""
    torch.manual_seed(1)
    x = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)
    grad_h = torch.randn(rows, rank, device=DEVICE, dtype=DTYPE)
    a = torch.randn(rank, cols, device=DEVICE, dtype=a_dtype) * 0.1
    mask = mask_of(rows, cols, p, 5)
    _, keep = dropout_products.dropped_down_projection(x, a, p, seed=5)  # backward reads the forward's packed mask
    spread, grad_a = dropout_products.dropped_backward(x, grad_h, a, keep, p, scaling=0.5, grad_a_dtype=a_dtype, input_grad=input_grad)
    again = dropout_products.dropped_backward(x, grad_h, a, keep, p, scaling=0.5, grad_a_dtype=a_dtype, input_grad=input_grad)[1]
    assert torch.equal(again, grad_a), "a second backward over the same forward (retain_graph) gives the same, deterministic sum"
    if input_grad:
        assert spread is not None and spread.dtype == DTYPE
        assert relative_error(spread, 0.5 * mask * (grad_h.double() @ a.to(DTYPE).double())) < 5e-3
    else:
        assert spread is None
    assert grad_a.dtype == a_dtype
    assert relative_error(grad_a, 0.5 * grad_h.double().T @ (x.double() * mask)) < 5e-3


def test_applies_only_where_it_computes_the_same_function() -> None:
    x, a = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(16, 64)
    assert not dropout_products.dropped_products_apply(x, a), "CPU tensors take the two-pass path"
    if not torch.cuda.is_available() or launch.product_kernel("down_kernel") is None:
        return
    x, a = x.cuda(), a.cuda()
    assert dropout_products.dropped_products_apply(x, a) and dropout_products.dropped_products_apply(x, a.bfloat16())
    assert not dropout_products.dropped_products_apply(x.float(), a), "float32 would take TF32 products"
    assert not dropout_products.dropped_products_apply(x[:, :60], a[:, :60]), "not contiguous, nor a width of 8k"
    assert not dropout_products.dropped_products_apply(x, a.T.contiguous().T), "A read as laid out"
    assert not dropout_products.dropped_products_apply(x, a.half()), "A in float32 or x's dtype"
    assert not dropout_products.dropped_products_apply(x, torch.randn(128, 64, device="cuda")), "ranks over 64"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_linear_with_dropout_matches_float64_with_the_same_mask(dtype: torch.dtype) -> None:
    """bfloat16 takes the fused products, float32 the two-pass path: both give the function's outputs and gradients."""
    torch.manual_seed(2)
    p, seed, scaling = 0.1, 7, 2.0
    x = torch.randn(3, 100, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(192, 256, device="cuda") * 0.05).to(dtype)
    bias = torch.randn(192, device="cuda").to(dtype)
    a = (torch.randn(16, 256, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    b = (torch.randn(192, 16, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    out = LoraLinearFunction.apply(x, w, bias, a, b, scaling, p, seed)
    grads = torch.autograd.grad(out.float().pow(2).mean(), [x, a, b])
    mask = mask_of(300, 256, p, seed).view(3, 100, 256)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    want = x64 @ w.double().T + bias.double() + scaling * ((x64 * mask) @ a64.T) @ b64.T
    want_grads = torch.autograd.grad(want.pow(2).mean(), [x64, a64, b64])
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, expected in zip([out, *grads], [want, *want_grads]):
        assert relative_error(got, expected.detach()) < tolerance


@needs_cuda
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_kernel_adds_the_low_rank_product_to_either_weight_layout(transposed: bool) -> None:
    """The per-call merge of no-grad long batches; GPT-2's Conv1D hands over its weight transposed."""
    torch.manual_seed(3)
    weight = torch.randn(300, 200, device="cuda", dtype=torch.bfloat16)
    if transposed:
        weight = weight.T.contiguous().T
    b = torch.randn(300, 12, device="cuda", dtype=torch.bfloat16) * 0.1
    a = torch.randn(12, 200, device="cuda", dtype=torch.bfloat16)
    merged = kernels.merged_weight(weight, b, a)
    assert merged.is_contiguous() and merged.dtype == torch.bfloat16
    assert relative_error(merged, weight.double() + b.double() @ a.double()) < 4e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_float32_lora_weights_over_a_bf16_model(device: str, p: float) -> None:
    """Float32 LoRA (master) weights over bf16 activations: a bf16 output, float32 gradients, all within bf16 rounding
    of float64. On CUDA the fused kernels read ``A`` in float32 (with dropout) and float32 gradients come from their GEMMs."""
    torch.manual_seed(4)
    seed, scaling = 11, 2.0
    x = torch.randn(2, 64, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(96, 128, device=device) * 0.05).bfloat16()
    a = (torch.randn(16, 128, device=device) * 0.05).requires_grad_(True)
    b = (torch.randn(96, 16, device=device) * 0.05).requires_grad_(True)
    out = LoraLinearFunction.apply(x, w, None, a, b, scaling, p, seed)
    grads = torch.autograd.grad(out.float().pow(2).mean(), [x, a, b])
    assert out.dtype == grads[0].dtype == torch.bfloat16 and grads[1].dtype == grads[2].dtype == torch.float32
    kept = torch.ones(128, 128, dtype=torch.bool, device=device)
    if p > 0:  # the mask the path drew: the Triton kernel's on CUDA, torch's generator on the CPU
        drawn = mask_of(128, 128, p, seed) if device == "cuda" else dropout.seeded_dropout(torch.ones(128, 128, dtype=torch.bfloat16), p, seed)
        kept = drawn != 0
    mask = (kept.double() / (1 - p)).view(2, 64, 128)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    want = x64 @ w.double().T + scaling * ((x64 * mask) @ a64.T) @ b64.T
    want_grads = torch.autograd.grad(want.pow(2).mean(), [x64, a64, b64])
    for got, expected in zip([out, *grads], [want, *want_grads]):
        assert relative_error(got, expected.detach()) < 1e-2
