"""Stepping the optimizer inside backward: the same updates as a normal loop, without keeping every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import train, trainable

import peftkit
from peftkit import PeftkitError
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_qlora import OptimizerInBackward, prepare_model_for_kbit_training, quantize_model


def lora_model() -> peftkit.PeftModel:
    base = prepare_model_for_kbit_training(quantize_model(tiny_model("llama"), bnb_4bit_compute_dtype=torch.float32))
    torch.manual_seed(0)
    return peftkit.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("bucket_size", [1, 5, 1000])
def test_same_updates_as_one_adamw_under_gradient_checkpointing(bucket_size: int) -> None:
    reference, stepped = lora_model(), lora_model()
    train(reference, torch.optim.AdamW(trainable(reference), lr=1e-2, weight_decay=0.1))
    optimizer = OptimizerInBackward(trainable(stepped), torch.optim.AdamW, bucket_size=bucket_size, lr=1e-2, weight_decay=0.1)
    train(stepped, optimizer)
    moved = 0
    for (name, want), got in zip(reference.named_parameters(), stepped.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        moved += want.requires_grad
    assert moved > 0
    assert all(p.grad is None for p in trainable(stepped)), "gradients are freed once used"


def test_learning_rate_state_and_removal() -> None:
    model = lora_model()
    optimizer = OptimizerInBackward(trainable(model), torch.optim.AdamW, bucket_size=4, lr=1e-2)
    optimizer.set_lr(0.0)
    before = [p.detach().clone() for p in trainable(model)]
    train(model, optimizer, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable(model))), "lr 0 leaves the weights alone"
    state = optimizer.state_dict()
    other = OptimizerInBackward(trainable(model), torch.optim.AdamW, bucket_size=4, lr=1e-2)
    other.load_state_dict(state)
    assert other.optimizers[0].state_dict()["state"].keys() == optimizer.optimizers[0].state_dict()["state"].keys()
    mismatched = OptimizerInBackward(trainable(model), torch.optim.AdamW, bucket_size=3)
    with pytest.raises(PeftkitError, match="same bucket_size"):
        mismatched.load_state_dict(state)
    for each in (optimizer, other, mismatched):
        each.remove()
    model(**sample_inputs("llama", labels=True)).loss.backward()
    assert all(p.grad is not None for p in trainable(model)), "after remove(), gradients are left for the caller"


def test_unused_parameters_and_bad_arguments_are_named() -> None:
    model = lora_model()
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer = OptimizerInBackward([*trainable(model), extra], torch.optim.AdamW, bucket_size=1000)
    model(**sample_inputs("llama", labels=True)).loss.backward()
    with pytest.raises(PeftkitError, match="got no gradient"):
        optimizer.step()
    with pytest.raises(PeftkitError, match="no parameters"):
        OptimizerInBackward([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], torch.optim.AdamW)
    with pytest.raises(PeftkitError, match="bucket_size"):
        OptimizerInBackward(trainable(model), torch.optim.AdamW, bucket_size=0)
