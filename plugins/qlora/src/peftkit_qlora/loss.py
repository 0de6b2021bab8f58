"""transformers' causal-LM loss, computed a slice of rows at a time so that no float32 logits are kept.

transformers' ``ForCausalLMLoss`` upcasts the whole ``tokens x vocab`` logits to
float32 and keeps their log-softmax for the backward pass: with 1024 tokens
and a 32000 vocabulary that is 125 MiB for each of the upcast, the
log-softmax and its gradient, the largest live tensors of a QLoRA step. Here
the forward keeps only the (bf16) logits and one float32 log-sum-exp per
row; the backward rebuilds the softmax slice by slice. The loss and gradients
are the same float32 math, summed in another order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Rows per slice: keeps each float32 slice of the logits near 32 MiB.
SLICE_BYTES = 32 * 2**20


class _SlicedCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropy of ``logits`` (rows x vocab) against ``targets``, skipping ``ignore_index``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        rows = max(1, SLICE_BYTES // (4 * logits.shape[-1]))
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            block = logits[start : start + rows].float()
            target = targets[start : start + rows]
            valid = target != ignore_index
            block_lse = torch.logsumexp(block, dim=-1)
            lse[start : start + rows] = block_lse
            picked = block.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((block_lse - picked) * valid).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            target = targets[start:stop]
            valid = (target != ctx.ignore_index).unsqueeze(1)
            # one float32 slice, worked on in place: softmax, minus one at the target, times the incoming gradient
            probs = logits[start:stop].to(torch.float32, copy=True)
            probs.sub_(lse[start:stop].unsqueeze(1)).exp_()
            probs.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -valid.to(probs.dtype))
            grad[start:stop] = probs.mul_(valid * grad_total)
        return grad, None, None


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` (same arguments, same value), without float32 logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat_logits.device)
    total = _SlicedCrossEntropy.apply(flat_logits, targets, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_sliced_loss(model: torch.nn.Module) -> bool:
    """Give a transformers causal LM :func:`causal_lm_loss`; ``False`` if its loss is another one."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return False
    model.loss_function = causal_lm_loss
    return True
