"""The Triton dropout kernel (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1): a seeded mask of the right rate."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit_lora import dropout

triton_runs = dropout._triton_kernel() is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not triton_runs, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_rate_scale_and_seed(p: float) -> None:
    x = torch.randn(97, 301, device=DEVICE)  # not a multiple of the block, nor of 8
    out = dropout._triton_dropout(x, p, seed=11)
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert torch.equal(dropout._triton_dropout(x, p, seed=11), out), "same seed, same mask"
    assert not torch.equal(dropout._triton_dropout(x, p, seed=12) != 0, kept), "another seed, another mask"


def test_mask_depends_on_index_only() -> None:
    """The backward pass regenerates the mask on a tensor of another dtype and values: it must be the same."""
    x = torch.randn(64, 200, device=DEVICE)
    first = dropout._triton_dropout(x, 0.3, seed=5) != 0
    again = dropout._triton_dropout(torch.ones_like(x, dtype=torch.float16), 0.3, seed=5) != 0
    assert torch.equal(first, again)


def test_elements_sharing_a_random_draw_are_independent() -> None:
    """Eight elements share one Philox call (16 bits each): neighbours must not drop together."""
    kept = dropout._triton_dropout(torch.ones(4096, 64, device=DEVICE), 0.5, seed=3).reshape(-1, 8) != 0
    for lane in range(1, 8):
        agreement = (kept[:, 0] == kept[:, lane]).double().mean().item()
        assert abs(agreement - 0.5) < 0.02, (lane, agreement)


def test_pair_uses_one_mask_for_both_tensors_and_masks_the_second_in_place() -> None:
    x = torch.randn(33, 70, device=DEVICE)
    t = torch.randn(33, 70, device=DEVICE, dtype=torch.float16)
    expected_t = dropout._triton_dropout(t, 0.3, 9)
    dropped_x, dropped_t = dropout._triton_dropout(x, 0.3, 9, t)
    assert dropped_t is t, "the gradient is masked where it lies"
    assert torch.equal(dropped_x, dropout._triton_dropout(x, 0.3, 9))
    assert torch.equal(dropped_t != 0, dropped_x != 0)
    torch.testing.assert_close(dropped_t, expected_t)
