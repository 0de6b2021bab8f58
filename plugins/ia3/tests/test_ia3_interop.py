"""(IA)^3 adapters move both ways between peftkit and Hugging Face PEFT (the real package) with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from ia3_helpers import KINDS, TASK_TYPES, fresh, logits, randomise_heads
from safetensors.torch import load_file

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_ia3 import IA3Config

# Each kind: PEFT's architecture defaults, and an explicit choice with a regex feed-forward pattern.
EXPLICIT = {
    "llama": {
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
        "feedforward_modules": ".*mlp\\.(up|down)_proj",
    },
    "gpt2": {"target_modules": ["c_attn", "c_proj", "c_fc"], "feedforward_modules": ["c_fc"]},
    "bert": {"target_modules": ["query", "value", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
    "t5": {"target_modules": ["q", "o", "wi", "wo"], "feedforward_modules": ["wi", "wo"]},
}


def options(kind: str, choice: str) -> dict:
    return {} if choice == "defaults" else EXPLICIT[kind]


@pytest.mark.parametrize("choice", ["defaults", "explicit"])
@pytest.mark.parametrize("kind", KINDS)
def test_peftkit_adapter_loads_in_peft(kind: str, choice: str, tmp_path: Path) -> None:
    inputs = sample_inputs(kind)
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(
        fresh(kind), IA3Config(init_ia3_weights=False, task_type=TASK_TYPES[kind], **options(kind, choice))
    )
    randomise_heads(ours)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path)

    expected = logits(ours, inputs)
    assert not torch.allclose(expected, logits(fresh(kind), inputs)), "the adapter must change the outputs"
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_peftkit(kind: str, tmp_path: Path) -> None:
    inputs = sample_inputs(kind)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(fresh(kind), peft.IA3Config(init_ia3_weights=False, task_type=TASK_TYPES[kind]))
    randomise_heads(theirs)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path)

    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.parameters()), "a loaded adapter is frozen unless is_trainable"


@pytest.mark.parametrize("kind", KINDS)
def test_same_tensor_keys_shapes_and_config_as_peft(kind: str, tmp_path: Path) -> None:
    config = {"task_type": TASK_TYPES[kind]}
    peftkit.get_peft_model(fresh(kind), IA3Config(**config)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(fresh(kind), peft.IA3Config(**config)).save_pretrained(tmp_path / "theirs")

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(k.endswith(".ia3_l") for k in ours if ".classifier." not in k)
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_config) <= set(their_config), "every field we write is one PEFT knows"
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(our_config[key]) == sorted(their_config[key]), key
    for key in ("peft_type", "task_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules"):
        assert our_config[key] == their_config[key], key


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_equal_peft_merge(kind: str, tmp_path: Path) -> None:
    """PEFT's adapter with explicit targets loads here, and merging gives exactly the weights PEFT's merge gives."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(fresh(kind), peft.IA3Config(init_ia3_weights=False, **EXPLICIT[kind]))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path)
    inputs = sample_inputs(kind)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=0)

    their_weights = theirs.merge_and_unload().state_dict()
    our_weights = ours.merge_and_unload().state_dict()
    assert sorted(our_weights) == sorted(their_weights)
    for key, value in their_weights.items():
        assert torch.equal(our_weights[key], value), key


def test_all_linear_both_ways(tmp_path: Path) -> None:
    """PEFT saves "all-linear" targets as full names, which PEFT itself then refuses to reload; peftkit loads them."""
    inputs = sample_inputs("llama")
    config = {"target_modules": "all-linear", "feedforward_modules": ["down_proj"], "init_ia3_weights": False}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(fresh("llama"), peft.IA3Config(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.PeftModel.from_pretrained(fresh("llama"), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=0)

    ours = peftkit.get_peft_model(fresh("llama"), IA3Config(**config))
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path / "ours")
    assert len(ours.adapter_state_dict("default")) == 14
    torch.testing.assert_close(logits(back, inputs), logits(ours, inputs), rtol=0, atol=0)
