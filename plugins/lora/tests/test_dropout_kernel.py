"""The Triton dropout kernel (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1): a seeded mask of the right rate."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit_lora import dropout, launch

triton_runs = dropout._triton_kernel() is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not triton_runs, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_rate_scale_and_seed(p: float) -> None:
    x = torch.randn(97, 301, device=DEVICE)  # not a multiple of the block, nor of 8
    out = dropout._triton_dropout(x, p, seed=11)
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert torch.equal(dropout._triton_dropout(x, p, seed=11), out), "same seed, same mask"
    assert not torch.equal(dropout._triton_dropout(x, p, seed=12) != 0, kept), "another seed, another mask"


@needs_triton
def test_mask_depends_on_index_only() -> None:
    """The backward pass regenerates the mask on a tensor of another dtype and values: it must be the same."""
    x = torch.randn(64, 200, device=DEVICE)
    first = dropout._triton_dropout(x, 0.3, seed=5) != 0
    again = dropout._triton_dropout(torch.ones_like(x, dtype=torch.float16), 0.3, seed=5) != 0
    assert torch.equal(first, again)


@needs_triton
def test_elements_sharing_a_random_draw_are_independent() -> None:
    """Eight elements share one Philox call (16 bits each): neighbours must not drop together."""
    kept = dropout._triton_dropout(torch.ones(4096, 64, device=DEVICE), 0.5, seed=3).reshape(-1, 8) != 0
    for lane in range(1, 8):
        agreement = (kept[:, 0] == kept[:, lane]).double().mean().item()
        assert abs(agreement - 0.5) < 0.02, (lane, agreement)


@needs_triton
def test_pair_uses_one_mask_for_both_tensors_and_masks_the_second_in_place() -> None:
    x = torch.randn(33, 70, device=DEVICE)
    t = torch.randn(33, 70, device=DEVICE, dtype=torch.float16)
    expected_t = dropout._triton_dropout(t, 0.3, 9)
    dropped_x, dropped_t = dropout._triton_dropout(x, 0.3, 9, t)
    assert dropped_t is t, "the gradient is masked where it lies"
    assert torch.equal(dropped_x, dropout._triton_dropout(x, 0.3, 9))
    assert torch.equal(dropped_t != 0, dropped_x != 0)
    torch.testing.assert_close(dropped_t, expected_t)


@needs_triton
def test_salt_keys_the_masks_of_each_graph_replay() -> None:
    """A CUDA graph replays its captured seeds; the salt it advances by ``1 << 32`` per replay must give new masks."""
    x = torch.ones(64, 256, device=DEVICE)
    salt = dropout.seed_salt(x.device)
    kept = salt.clone()  # graphs replayed by other tests have advanced it
    masks = []
    try:
        for replay in range(3):
            salt.fill_(replay << 32)
            masks.append(dropout._triton_dropout(x, 0.5, seed=7) != 0)
            assert torch.equal(dropout._triton_dropout(x, 0.5, seed=7) != 0, masks[-1]), "same seed and salt, same mask"
    finally:
        salt.copy_(kept)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cached launch applies to compiled kernels (CUDA)")
def test_cached_launches_compute_what_triton_launches_do() -> None:
    """After a first launch, calls like it skip Triton's argument binding; every later call must give the same result."""
    x = torch.randn(300, 301, device=DEVICE, dtype=torch.bfloat16)
    launches = [dropout._triton_dropout(x, 0.2, seed) for seed in (16, 17, 16, 17, 1)]  # seeds in each int class
    assert torch.equal(launches[0], launches[2]) and torch.equal(launches[1], launches[3])
    assert not torch.equal(launches[0], launches[1])
    unaligned = x.view(-1)[1:]  # 2 bytes off 16: always the ordinary launch
    reference = unaligned.clone()
    torch.testing.assert_close(dropout._triton_dropout(unaligned, 0.2, 16), dropout._triton_dropout(reference, 0.2, 16))


def test_launch_key_separates_what_triton_compiles_apart() -> None:
    key = launch._specialization
    t = torch.zeros(8)
    assert key((t, 1), {}) != key((t, 2), {}) != key((t, 32), {}), "ints are specialized on == 1 and on % 16"
    assert key((t, 2), {}) == key((t, 3), {}) and key((t, 16), {}) == key((t, 48), {})
    assert key((t, 2), {}) != key((t, 2**40), {}), "64-bit ints are another signature"
    assert key((t, 2), {"BLOCK": 8}) != key((t, 2), {"BLOCK": 16})
    assert key((t.double(), 2), {}) != key((t, 2), {})
    assert key((t[1:], 2), {}) is None, "unaligned pointers are left to Triton"
