"""AdaLoRA adapters move both ways between peftkit and Hugging Face PEFT (the real package) with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from adalora_helpers import (
    SCHEDULE,
    config_fields,
    fresh,
    logits,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread)
    peft_allocate,
    peftkit_model,
    randomise_heads,
    train,
)
from safetensors.torch import load_file

import peftkit
from peftkit.testing.models import MODEL_KINDS, sample_inputs
from peftkit_adalora import orthogonal_regularization, rank_allocator


@pytest.fixture(params=MODEL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _total_rank(path: Path) -> int:
    tensors = load_file(path / "adapter_model.safetensors")
    return sum(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_E"))


def test_trained_peftkit_adapter_loads_in_peft(kind: str, tmp_path: Path) -> None:
    ours = peftkit_model(kind)
    train(ours, kind, SCHEDULE["total_step"])
    randomise_heads(ours)
    ours.save_pretrained(tmp_path)
    modules = len(rank_allocator(ours).ranks())
    assert _total_rank(tmp_path) == SCHEDULE["target_r"] * modules, "the file holds the allocated ranks only"

    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path)

    inputs = sample_inputs(kind)
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ADALORA"


def test_trained_peft_adapter_loads_in_peftkit(kind: str, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(fresh(kind), peft.AdaLoraConfig(**config_fields(kind)))
    train(theirs, kind, SCHEDULE["total_step"], allocate=peft_allocate, order="before_zero_grad")
    randomise_heads(theirs)
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved and all(len(mask) == SCHEDULE["init_r"] for mask in saved.values())

    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path)

    inputs = sample_inputs(kind)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters()), "a loaded adapter is frozen unless is_trainable"
    assert rank_allocator(ours).ranks() == {k.removesuffix(".lora_E"): sum(v) for k, v in saved.items()}
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == saved
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in again.items()} == {
        k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
    }


def test_same_tensor_keys_and_config_fields_as_peft(kind: str, tmp_path: Path) -> None:
    fields = config_fields(kind, target_modules=["q_proj", "v_proj", "c_attn", "query", "value", "q", "v"])
    peftkit_model(kind, **fields).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(fresh(kind), peft.AdaLoraConfig(**fields)).save_pretrained(tmp_path / "theirs")

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_config) <= set(their_config), "every field we write is one PEFT knows"
    for key in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
        "rank_pattern",
        "lora_alpha",
        "peft_type",
        "task_type",
        "bias",
        "modules_to_save",
    ):
        assert our_config[key] == their_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])


def test_training_loss_with_regulariser_matches_peft(kind: str, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(fresh(kind), peft.AdaLoraConfig(**config_fields(kind, init_lora_weights=False)))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path, is_trainable=True)
    inputs = sample_inputs(kind, labels=True)

    their_loss = theirs.train()(**inputs).loss
    our_loss = ours.train()(**inputs).loss
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        plain = ours.eval()(**inputs).loss  # eval mode: no regulariser added
        regulariser = orthogonal_regularization(ours)
    assert regulariser > 0
    torch.testing.assert_close(our_loss.detach(), plain + regulariser, rtol=1e-5, atol=1e-5)


def test_lockstep_training_with_peft_allocates_the_same_ranks(tmp_path: Path) -> None:
    """From identical weights, on identical gradients, both allocators keep the same triplets."""
    kind = "llama"
    fields = config_fields(kind, init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1)
    theirs = peft.get_peft_model(fresh(kind), peft.AdaLoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path, is_trainable=True)

    # PEFT scores |w * grad| with the weights it finds; calling both before optimizer.step() gives both the same ones.
    train(theirs, kind, 6, allocate=peft_allocate, order="before_step")
    train(ours, kind, 6, order="before_step")

    their_pattern = {k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == their_pattern
    inputs = sample_inputs(kind)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-4, atol=1e-4)


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def test_conv2d_both_ways(tmp_path: Path) -> None:
    fields = {**SCHEDULE, "target_modules": ["conv", "head"], "init_lora_weights": False}
    x = torch.randn(2, 3, 5, 5)
    theirs = peft.get_peft_model(_conv_net(), peft.AdaLoraConfig(**fields)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.PeftModel.from_pretrained(_conv_net(), tmp_path / "theirs").eval()
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(_conv_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_both_ways(bias: str, tmp_path: Path) -> None:
    kind = "gpt2"
    theirs = peft.get_peft_model(
        fresh(kind), peft.AdaLoraConfig(**config_fields(kind, bias=bias, init_lora_weights=False))
    )
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(torch.randn_like(param))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path / "theirs")
    inputs = sample_inputs(kind)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    back = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(back, inputs), expected, rtol=1e-5, atol=1e-5)
