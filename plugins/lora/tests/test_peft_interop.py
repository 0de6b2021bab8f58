"""Adapters move both ways between peftkit and Hugging Face PEFT (the real package) with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import TASK_TYPES, fresh, logits
from safetensors.torch import load_file

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_lora import LoraConfig

OPTIONS = [
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "use_rslora": True, "lora_alpha": 16, "rank_pattern": {r"\w+\.0\..*": 2}},
]


def _randomise_heads(model: torch.nn.Module) -> None:
    """Make trained-in-full heads differ from the base so a wrong head would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "rslora-rank-pattern"])
def test_peftkit_adapter_loads_in_peft(kind: str, options: dict, tmp_path: Path) -> None:
    inputs = sample_inputs(kind)
    ours = peftkit.get_peft_model(fresh(kind), LoraConfig(r=4, init_lora_weights=False, task_type=TASK_TYPES[kind], **options))
    _randomise_heads(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()

    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), rtol=1e-4, atol=5e-4)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "rslora-rank-pattern"])
def test_peft_adapter_loads_in_peftkit(kind: str, options: dict, tmp_path: Path) -> None:
    inputs = sample_inputs(kind)
    theirs = peft.get_peft_model(fresh(kind), peft.LoraConfig(r=4, init_lora_weights=False, task_type=TASK_TYPES[kind], **options))
    _randomise_heads(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()

    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-4, atol=5e-4)
    assert not any(p.requires_grad for p in ours.parameters()), "a loaded adapter is frozen unless is_trainable"


def test_same_tensor_keys_and_config_fields_as_peft(kind: str, tmp_path: Path) -> None:
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "c_attn", "query", "value", "q", "v"], "task_type": TASK_TYPES[kind]}
    peftkit.get_peft_model(fresh(kind), LoraConfig(**config)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(fresh(kind), peft.LoraConfig(**config)).save_pretrained(tmp_path / "theirs")

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_config) <= set(their_config), "every field we write is one PEFT knows"
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])
    for key in ("r", "lora_alpha", "peft_type", "task_type", "bias", "modules_to_save"):
        assert our_config[key] == their_config[key], key


def test_embedding_lora_both_ways(tmp_path: Path) -> None:
    inputs = sample_inputs("llama")
    config = {"r": 4, "target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": False}
    theirs = peft.get_peft_model(fresh("llama"), peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT also saves the whole embedding here
    ours = peftkit.PeftModel.from_pretrained(fresh("llama"), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-4, atol=5e-4)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_move_both_ways(bias: str, tmp_path: Path) -> None:
    inputs = sample_inputs("gpt2")
    config = {"r": 4, "target_modules": ["c_attn"], "init_lora_weights": False, "bias": bias}
    theirs = peft.get_peft_model(fresh("gpt2"), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith("bias") and param.requires_grad:  # the biases this adapter trains
                param.add_(0.5)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = peftkit.PeftModel.from_pretrained(fresh("gpt2"), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-4, atol=5e-4)
    ours.save_pretrained(tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
