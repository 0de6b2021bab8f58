"""Compiled blocks and checkpoint inputs kept in host memory: the same training, run another way."""

from __future__ import annotations

import pytest
import torch
from conftest import quantized, train, trainable

import peftkit
from peftkit import PeftkitError
from peftkit.testing.models import sample_inputs
from peftkit_lora import LoraConfig
from peftkit_qlora import prepare_model_for_kbit_training
from peftkit_qlora.blocks import HostOffloadedCheckpoint, checkpointed_blocks, compile_blocks


def lora_model(dropout: float = 0.1, **prepare: object) -> peftkit.PeftModel:
    base = prepare_model_for_kbit_training(quantized("llama"), **prepare)  # type: ignore[arg-type]
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return peftkit.get_peft_model(base, config).train()


def loss_and_grads(model: peftkit.PeftModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss = model(**sample_inputs("llama", labels=True)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_offloaded_block_inputs_give_the_same_loss_and_gradients() -> None:
    expected_loss, expected_grads = loss_and_grads(lora_model())
    model = lora_model()
    blocks = list(checkpointed_blocks(model))
    assert len(blocks) == 2
    for block in blocks:
        block._gradient_checkpointing_func = HostOffloadedCheckpoint(block._gradient_checkpointing_func)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) == 28  # A and B of 7 linears in 2 blocks
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)


def test_compiled_blocks_compute_what_the_eager_model_does() -> None:
    expected_loss, expected_grads = loss_and_grads(lora_model(dropout=0.0))
    model = lora_model(dropout=0.0, compile_blocks=True)
    attention = next(checkpointed_blocks(model)).self_attn
    assert attention._compiled_call_impl is not None
    loss, grads = loss_and_grads(model)
    # the same float32 math, fused and summed in another order
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_compiled_blocks_train_with_dropout() -> None:
    model = lora_model(dropout=0.1, compile_blocks=True)
    losses = train(model, torch.optim.AdamW(trainable(model), lr=1e-2), steps=5)
    assert losses[-1] < losses[0], losses


def test_clear_errors() -> None:
    with pytest.raises(PeftkitError, match="no checkpointable blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = quantized("llama")
    trainable_before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(PeftkitError, match="use_gradient_checkpointing=True"):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, compile_blocks=True)
    assert [p.requires_grad for p in model.parameters()] == trainable_before, "a refused call leaves the model as it was"
    assert any(trainable_before)
    if torch.cuda.is_available():
        with pytest.raises(PeftkitError, match="non-reentrant"):
            prepare_model_for_kbit_training(quantized("llama"), offload_checkpoints=True, gradient_checkpointing_kwargs={"use_reentrant": True})
