"""P-tuning v2 adapter folders: PEFT's layout, and prefix-tuning-compatible tensors on single-stack models."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import fresh, inputs_for, logits, prompted
from safetensors.torch import load_file

import peftkit
from peftkit import ConfigError
from peftkit_ptuning_v2 import PTuningV2Config, prefix_tuning_config


def _randomise_heads(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))


def test_folder_layout(tmp_path: Path) -> None:
    model = prompted("bert")
    _randomise_heads(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING_V2" and config["prefix_dropout"] == 0.0
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    loaded = peftkit.PeftModel.from_pretrained(fresh("bert"), tmp_path)
    assert isinstance(loaded.peft_config["default"], PTuningV2Config)
    torch.testing.assert_close(logits(loaded, inputs_for("bert")), logits(model, inputs_for("bert")))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "bert-tokens"])
def test_single_stack_files_are_prefix_tuning_files(kind: str, tmp_path: Path) -> None:
    """Same tensors, a rewritten config: Hugging Face PEFT and peftkit-prefix load it with identical outputs."""
    inputs = inputs_for(kind)
    ours = prompted(kind)
    _randomise_heads(ours)
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path)
    converted = prefix_tuning_config(ours.peft_config["default"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(converted.to_dict()))

    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=1e-5, atol=1e-5)
    as_prefix = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert as_prefix.peft_config["default"].peft_type == "PREFIX_TUNING"
    torch.testing.assert_close(logits(as_prefix, inputs), expected, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_files_have_no_prefix_tuning_equivalent() -> None:
    model = prompted("t5")
    with pytest.raises(ConfigError, match="single-stack"):
        prefix_tuning_config(model.peft_config["default"])


def test_lora_and_p_tuning_v2_on_one_model() -> None:
    if "lora" not in peftkit.get_registry().methods:
        pytest.skip("needs the peftkit-lora plugin")
    LoraConfig = peftkit.get_registry().method("lora").config_class
    inputs = inputs_for("bert")
    model = peftkit.get_peft_model(
        fresh("bert"), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS")
    )
    lora = logits(model, inputs)
    torch.manual_seed(1)
    model.add_adapter("deep", PTuningV2Config(num_virtual_tokens=3, task_type="SEQ_CLS"))
    model.set_adapter("deep")
    deep = logits(model, inputs)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), lora)
    model.set_adapter("deep")
    torch.testing.assert_close(logits(model, inputs), deep)
    assert not torch.allclose(deep, lora)
    with pytest.raises(ValueError, match="does not support mixed batches"):
        model(**inputs, adapter_names=["deep", "default"])
