"""The fast LoRA linear: one autograd function for ``x W^T + b + s * B A dropout(x)``.

What it saves against the plain composition of modules (Hugging Face PEFT's):

- no dropout copy of ``x`` is kept: the mask is a function of a seed (see
  :mod:`peftkit_lora.dropout`), regenerated in backward; on CUDA in 16 bits
  it is drawn inside the low-rank products themselves
  (:mod:`peftkit_lora.dropout_products`), so ``dropout(x)`` is never written,
  and kept for backward packed, a bit per element, instead of drawn again;
- without gradients on CUDA, a batch long enough that it moves fewer bytes computes
  with a merged copy of the weight made for the call (see
  :func:`_merging_moves_less`); so does training without dropout in full
  float32 (see :func:`_merges_in_training`), the copy kept for the input
  gradient in backward;
- no ``(N, out)`` temporaries for the scaled LoRA output and the sum: the
  low-rank product is written first and the base matmul accumulates onto it
  (``addmm_`` with beta = 1 reads it inside the compute-bound base GEMM);
  backward does the same for the input gradient;
- few kernels per call, as a training step on a fast GPU waits on their
  launches: the scale rides on ``h`` (applied in the fused products' kernels,
  or folded into the cast of ``A``), so ``B``'s gradient needs no scaling
  pass; the fused kernels read float32 ``A`` as it is, and a float32
  gradient of ``B`` is written by its GEMM, with no cast pass;
- backward stores only ``x`` (which q/k/v share), the ``(N, r)`` product ``h``,
  with the fused dropout its bit mask, and on the merged path the merged copy;
- on a CPU the rank-``r`` products are computed with the rank as the
  output's rows, as :func:`_rank_product` says, and a scale rides in the
  GEMM's ``alpha`` rather than in a pass of its own.

It computes the same function as the plain path (dropout on the LoRA input,
kept values scaled by ``1 / (1 - p)``), which the tests check against a
float64 reference with ``gradcheck``.

A base weight that is stored packed (QLoRA's 4-bit layers) comes in as a
``weight_slices`` callable instead, giving the dense weight a slice of rows at
a time: it is rebuilt in forward and again in backward and never kept whole,
each slice dropped once its rows of the product are done. LoRA
weights in another dtype than ``x`` (float32 master weights over a bf16
model) are read or cast inside, and their gradients come back in their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from peftkit_lora.dropout import draw_seed, seeded_dropout, seeded_dropout_pair
from peftkit_lora.dropout_products import (
    HALF_DTYPES,
    MAX_RANK,
    dropped_backward,
    dropped_down_projection,
    dropped_products_apply,
)
from peftkit_lora.launch import product_kernel, rank_block, triton_blocks

# Row slices ``(rows, dense)`` of a packed base weight, built one at a time as the iterable is advanced.
WeightSlices = Callable[[], Iterable[tuple[slice, torch.Tensor]]]


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    weight_slices: WeightSlices | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused forward: ``(out, input_weight, a, b, h, keep)``; the rest is what backward needs.

    ``input_weight`` is what the input gradient goes through: ``weight``, or
    the merged copy ``W + scaling * B A`` where :func:`_merges_in_training`
    (which then also holds in backward). ``a``, ``b`` are the LoRA weights as
    the products take them, ``keep`` the packed dropout mask where it was
    drawn inside the products.

    The scale rides on ``h = scaling * dropout(x) A^T``: ``out = h B^T + x W^T + bias``. The fused products
    apply it in the kernel and read ``A`` in its own dtype (``a`` is ``lora_a``); the merged path applies it
    in its GEMMs (``a`` is ``A`` in ``x``'s dtype); elsewhere ``a`` is ``scaling * A`` in ``x``'s dtype. ``b``
    is ``B`` in ``x``'s dtype, so ``B``'s gradient ``g^T h`` needs no scaling.
    """
    flat_x = x.reshape(-1, x.shape[-1])
    b = _as(lora_b, x.dtype)
    if _merges_in_training(flat_x, weight, dropout_p):
        assert weight is not None
        a = _as(lora_a, x.dtype)
        h = _rank_product(flat_x, a.T, scaling)
        merged = merged_weight(weight, b, a, scaling)
        out = torch.nn.functional.linear(flat_x, merged, None if bias is None else _as(bias, x.dtype))
        return out.view(*x.shape[:-1], out.shape[-1]), merged, a, b, h, None
    keep = None
    if dropout_p > 0 and dropped_products_apply(flat_x, lora_a):
        a = lora_a
        h, keep = dropped_down_projection(flat_x, a, dropout_p, seed, scaling)  # the mask drawn inside: no dropped copy of x
    else:
        a = _scaled(lora_a, scaling, x.dtype)
        lora_in = seeded_dropout(flat_x, dropout_p, seed) if dropout_p > 0 else flat_x
        h = _rank_product(lora_in, a.T)
        del lora_in  # the dropped copy of x is not kept, nor alive while a packed weight is rebuilt
    out = torch.addmm(_as(bias, x.dtype), h, b.T) if bias is not None else h @ b.T
    if weight_slices is None:
        assert weight is not None
        out.addmm_(flat_x, weight.T)
    else:
        for rows, dense in weight_slices():
            out[:, rows].addmm_(flat_x, dense.T)
            del dense  # a packed weight's slice is freed before the next one is built
    return out.view(*x.shape[:-1], out.shape[-1]), weight, a, b, h, keep


def lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    keep: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: int,
    weight_slices: WeightSlices | None,
    input_grad: bool,
    lora_dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The fused backward from :func:`lora_forward`'s saved values (``weight``: its ``input_weight``): ``(grad_x or None, grad_lora_a, grad_lora_b)``."""
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    flat_x = x.reshape(-1, x.shape[-1])
    grad_h = _rank_product(flat_grad, b)  # (N, r): the gradient of h, which carries the scale
    grad_b = _lora_grad(flat_grad.T, h, lora_dtypes[1])
    if keep is not None:
        # one kernel writes the masked low-rank term and gives A's gradient; the base gradient accumulates onto the term
        spread, grad_a = dropped_backward(flat_x, grad_h.contiguous(), a, keep, dropout_p, scaling, lora_dtypes[0], input_grad)
        grad_x = None if spread is None else _base_input_grad(flat_grad, weight, weight_slices, onto=spread).view_as(x)
        return grad_x, grad_a, grad_b
    if _merges_in_training(flat_x, weight, dropout_p):
        assert weight is not None
        grad_a = _lora_grad(grad_h.T, flat_x, lora_dtypes[0], scaling)
        if not input_grad:
            return None, grad_a, grad_b
        return (flat_grad @ weight).view_as(x), grad_a, grad_b  # through the forward's merged copy
    grad_x = grad_h @ a if input_grad else None  # a carries the scale here
    lora_in = flat_x
    if dropout_p > 0 and grad_x is not None:  # the same mask for the input and its gradient, drawn once
        lora_in, grad_x = seeded_dropout_pair(flat_x, grad_x, dropout_p, seed)
    elif dropout_p > 0:
        lora_in = seeded_dropout(flat_x, dropout_p, seed)
    grad_a = _lora_grad(grad_h.T, lora_in, lora_dtypes[0], scaling)
    del lora_in
    if grad_x is not None:
        grad_x = _base_input_grad(flat_grad, weight, weight_slices, onto=grad_x).view_as(x)
    return grad_x, grad_a, grad_b


def _base_input_grad(
    flat_grad: torch.Tensor, weight: torch.Tensor | None, weight_slices: WeightSlices | None, onto: torch.Tensor | None = None
) -> torch.Tensor:
    """``onto + grad W`` (accumulated in place), or ``grad W`` without ``onto``; a packed weight a slice of rows at a time."""
    if weight_slices is None:
        assert weight is not None
        return flat_grad @ weight if onto is None else onto.addmm_(flat_grad, weight)
    for rows, dense in weight_slices():
        part = flat_grad[:, rows]
        onto = part @ dense if onto is None else onto.addmm_(part, dense)
        del dense  # a packed weight's slice is freed before the next one is built
    assert onto is not None, "a packed weight gives at least one slice"
    return onto


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
        out, input_weight, a, b, h, keep = lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, weight_slices)
        ctx.save_for_backward(x, input_weight if ctx.needs_input_grad[0] else weight, a, b, h, keep)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.weight_slices = scaling, dropout_p, seed, weight_slices
        ctx.lora_dtypes = lora_a.dtype, lora_b.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, h, keep = ctx.saved_tensors
        grad_x, grad_a, grad_b = lora_backward(
            grad_out, x, weight, a, b, h, keep, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.weight_slices,
            ctx.needs_input_grad[0], ctx.lora_dtypes,
        )
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def _rank_product(m: torch.Tensor, n: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * (m @ n)`` for a product with a rank-``r`` side; on a CPU the short side as the output's rows (as ``(n^T m^T)^T`` where ``n`` has it).

    The same GEMM, but a CPU BLAS (oneDNN/MKL) runs it faster that way round
    (1024 tokens x 688 features, float32, r = 8, two cores, torch 2.13:
    ``x A^T`` 57 against 99 us, ``g^T h`` 44 against 131 us; ``g B``, whose
    operands are both stored as read, 103 against 90 us, even in a whole
    step), while cuBLAS runs the transposed form far slower (an H100 LoRA
    forward went from 1.17x to 1.67x the base).
    """
    if m.is_cuda or m.shape[0] <= n.shape[1]:
        return _product(m, n, scale)
    return _product(n.T, m.T, scale).T


def _product(m: torch.Tensor, n: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (m @ n)`` in one GEMM: ``addmm`` with ``beta = 0`` never reads its input (documented), so an empty one serves."""
    if scale == 1.0:
        return m @ n
    return torch.addmm(m.new_empty(()).expand(m.shape[0], n.shape[1]), m, n, beta=0, alpha=scale)


_GEMM_WRITES_FLOAT32 = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (CUDA, torch 2.8 and later)


def _lora_grad(m: torch.Tensor, n: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``scale * (m @ n)`` in ``dtype``, a LoRA weight's gradient: on CUDA a 16-bit product for float32
    weights is written in float32 by the GEMM itself, not rounded to 16 bits and cast in a second kernel."""
    if m.is_cuda and dtype == torch.float32 and m.dtype in HALF_DTYPES and _GEMM_WRITES_FLOAT32:
        product = torch.mm(m, n, out_dtype=torch.float32)
        return product if scale == 1.0 else product.mul_(scale)
    return _as(_rank_product(m, n, scale), dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a dispatch through ``Tensor.to`` when it already is (a few microseconds per layer and call)."""
    return t if t.dtype == dtype else t.to(dtype)


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
    """The fused LoRA linear; where nothing it computes needs a gradient it runs the same forward and saves nothing.

    That forward records no graph without a ``torch.no_grad()`` around it (entering one costs a few
    microseconds per layer and call): none of its inputs requires a gradient.
    """
    seed = draw_seed() if dropout_p > 0 else 0
    args = (x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, weight_slices)
    if torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        return LoraLinearFunction.apply(*args)
    if weight is not None and dropout_p == 0 and x.is_cuda and _merging_moves_less(x, weight):
        return _merged_forward(x, weight, bias, lora_a, lora_b, scaling)
    return lora_forward(*args)[0]


def _merging_moves_less(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``W + s B A``, built for this one call, moves fewer bytes than the low-rank products for these tokens.

    Applied on CUDA only: on the CPU, MKL's results for the merged copy vary in
    the last bit with its buffers' alignment, and a saved and reloaded adapter
    must give bitwise the same outputs.

    The two-GEMM path reads the input once more and writes and reads back an
    output-sized term: ``tokens * (in + 2 out)`` elements. Merging reads ``W``
    and writes the merged copy the GEMM then reads instead: ``2 in out``,
    whatever the batch (at 4,096 tokens a third of the traffic for the Llama
    shape's linears), and one kernel fewer.
    """
    out_features, in_features = weight.shape
    tokens = x.numel() // in_features
    return 2 * in_features * out_features <= tokens * (in_features + 2 * out_features)


_FULL_PRECISION = (torch.float32, torch.float64)


def _merges_in_training(flat_x: torch.Tensor, weight: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether a training call computes through ``W + s B A``, built in forward and kept for the input gradient.

    Exact without dropout only (with it the LoRA input differs from the base's),
    and only in full float32 or float64: a 16-bit (or TF32) copy would round
    away the small ``s B A`` of an adapter early in training, so the outputs
    would not follow its updates. The low-rank path writes and reads back an output-sized term in forward
    and an input-sized one in backward: ``2 tokens (in + out)`` elements;
    merging reads ``W`` and writes the copy, ``2 in out``, and drops
    those two rank-``r`` GEMMs for one of ``in * out * r``. ``h = x A^T`` is
    still computed: ``B``'s gradient needs it. The bound taken, ``2 in out <=
    tokens (in + out)``, also bounds the memory of the kept copy: at most half
    the layer's input and output together, while the tensors that the layer
    and its neighbours keep for backward are several times that.
    """
    if dropout_p > 0 or weight is None or flat_x.dtype not in _FULL_PRECISION:
        return False
    if flat_x.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return False
    out_features, in_features = weight.shape
    return 2 * in_features * out_features <= flat_x.shape[0] * (in_features + out_features)


def _merged_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``x (W + s B A)^T + b`` through a merged copy of the weight made for this call (the model's weight is untouched).

    In bf16 the merged copy is rounded once, as a merged model's weight is:
    the output stays within bf16 rounding of the unmerged computation.
    """
    merged = merged_weight(weight, _scaled(lora_b, scaling, x.dtype), _as(lora_a, x.dtype))
    return torch.nn.functional.linear(x, merged, None if bias is None else _as(bias, x.dtype))


MERGE_TILE = (64, 128, 4, 3)  # (rows, columns, num_warps, num_stages) per program of the merge kernel


def merged_weight(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``weight + scale * b @ a`` as a new tensor: on CUDA in 16 bits one Triton pass (cuBLAS runs this rank-``r`` GEMM
    at a third of the memory rate); the Triton pass takes a ``b`` scaled beforehand (``scale`` 1), as inference's cached one is."""
    launch = product_kernel("merge_kernel")
    rank = b.shape[1]
    if launch is None or not weight.is_cuda or weight.dtype not in HALF_DTYPES or rank > MAX_RANK or scale != 1.0:
        return torch.addmm(weight, b, a, alpha=scale)
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    block_n, block_k, warps, stages = MERGE_TILE
    grid = (triton_blocks(rows, block_n), triton_blocks(cols, block_k))
    launch(
        grid, weight, b.contiguous(), a.contiguous(), out, rows, cols, rank, weight.stride(0), weight.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=rank_block(rank), num_warps=warps, num_stages=stages,
    )
    return out

