"""Prefix-tuning adapters move both ways between peftkit and Hugging Face PEFT (the real package) with identical outputs.

Outputs are compared on the user's positions: prefixes are keys and values
only, so both libraries return logits of the input's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import TASK_TYPES, fresh, inputs_for, logits, randomise_heads
from safetensors.torch import load_file

import peftkit
from peftkit_prefix import PrefixTuningConfig

OPTIONS = [{}, {"prefix_projection": True, "encoder_hidden_size": 12}]
IDS = ["plain", "projection"]


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_peftkit_adapter_loads_in_peft(kind: str, options: dict, tmp_path: Path) -> None:
    inputs = inputs_for(kind)
    torch.manual_seed(1)
    ours = peftkit.get_peft_model(
        fresh(kind), PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK_TYPES[kind], **options)
    )
    randomise_heads(ours)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()

    expected = logits(ours, inputs)
    assert expected.shape == logits(fresh(kind), inputs).shape
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_peft_adapter_loads_in_peftkit(kind: str, options: dict, tmp_path: Path) -> None:
    inputs = inputs_for(kind)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        fresh(kind), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK_TYPES[kind], **options)
    )
    randomise_heads(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()

    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters()), "a loaded adapter is frozen unless is_trainable"


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_same_tensor_keys_shapes_and_config_fields_as_peft(kind: str, options: dict, tmp_path: Path) -> None:
    config = {"num_virtual_tokens": 3, "task_type": TASK_TYPES[kind], **options}
    peftkit.get_peft_model(fresh(kind), PrefixTuningConfig(**config)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(fresh(kind), peft.PrefixTuningConfig(**config)).save_pretrained(tmp_path / "theirs")

    ours, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours_config, theirs_config = (
        json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")
    )
    for field in (
        "peft_type",
        "num_virtual_tokens",
        "token_dim",
        "num_attention_heads",
        "num_layers",
        "num_transformer_submodules",
        "encoder_hidden_size",
        "prefix_projection",
        "task_type",
    ):
        assert ours_config[field] == theirs_config[field], field
    ignored = {"peft_version", "auto_mapping", "inference_mode", "modules_to_save", "base_model_name_or_path"}
    assert set(theirs_config) - ignored <= set(ours_config)


def test_peft_trained_projection_continues_training_here_on_the_prefixes(tmp_path: Path) -> None:
    """PEFT cannot load a projected adapter as trainable; here the saved prefixes become the trained table."""
    inputs = inputs_for("llama")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        fresh("llama"), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True)
    )
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="without the reparameterisation MLP"):
        ours = peftkit.PeftModel.from_pretrained(fresh("llama"), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)
    trainable = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.peftkit_prefixes.default.embedding.weight"]
