"""The sliced causal-LM loss: transformers' value and gradients, without keeping float32 logits."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_qlora import loss as sliced
from peftkit_qlora import prepare_model_for_kbit_training
from peftkit_qlora.loss import causal_lm_loss

VOCAB = 300


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 9, VOCAB, generator=generator) * 4).to(dtype)
    labels = torch.randint(0, VOCAB, (2, 9), generator=generator)
    labels[0, :3] = -100  # a masked prompt
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, torch.tensor(11)])
def test_same_value_and_gradient_as_transformers(
    dtype: torch.dtype, num_items: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sliced, "SLICE_BYTES", 4 * VOCAB * 5)  # five rows a slice: several slices, a short last one
    logits, labels = _case(dtype)
    ours_in = logits.clone().requires_grad_()
    theirs_in = logits.clone().requires_grad_()
    ours = causal_lm_loss(ours_in, labels, VOCAB, num_items_in_batch=num_items)
    theirs = ForCausalLMLoss(theirs_in, labels, VOCAB, num_items_in_batch=num_items)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ours_in.grad.dtype == dtype
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **tolerance)


def test_keeps_no_float32_logits() -> None:
    logits, labels = _case(torch.bfloat16)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    for loss_function in (ForCausalLMLoss, causal_lm_loss):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_function(logits.clone().requires_grad_(), labels, VOCAB)
        fp32_logits = [n for dtype, n in saved if dtype == torch.float32 and n == logits.numel()]
        assert bool(fp32_logits) == (loss_function is ForCausalLMLoss), f"{loss_function.__name__} saves {saved}"


def test_prepare_installs_it_on_causal_lms_only() -> None:
    llama = tiny_model("llama")
    inputs = sample_inputs("llama", labels=True)
    with torch.no_grad():
        before = llama(**inputs).loss
    prepare_model_for_kbit_training(llama, use_gradient_checkpointing=False)
    assert llama.loss_function is causal_lm_loss
    with torch.no_grad():
        torch.testing.assert_close(llama(**inputs).loss, before)
    bert = prepare_model_for_kbit_training(tiny_model("bert"), use_gradient_checkpointing=False)
    assert bert.loss_function is not causal_lm_loss
    kept = prepare_model_for_kbit_training(
        tiny_model("llama"), use_gradient_checkpointing=False, memory_efficient_loss=False
    )
    assert kept.loss_function is ForCausalLMLoss
