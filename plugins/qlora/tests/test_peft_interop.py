"""QLoRA adapters are plain PEFT LoRA: they move both ways with Hugging Face PEFT (the real package).

PEFT runs on the tiny models loaded 4-bit by transformers' BitsAndBytesConfig
(NF4, double quantization, fp32 compute), peftkit on the same models quantized
by peftkit-qlora (bit-identical, see test_quantize.py). With fp32 compute both
compute the same function, so logits agree to 1e-5; with bf16 compute
peftkit's LoRA delta runs in bf16 where PEFT's runs in fp32 (outside autocast),
so they agree to 0.1 on logits of magnitude ~3.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import TASK_TYPES, layer_types, loaded_in_4bit, logits, quantized

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_qlora import QLoraConfig, merge_and_unload

pytestmark = pytest.mark.filterwarnings("ignore::peftkit_qlora.QLoraMergeWarning", "ignore::UserWarning:peft")
EXACT = {"rtol": 1e-5, "atol": 1e-5}


def _randomise_heads(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))


def _ours(kind: str, **options: object) -> peftkit.PeftModel:
    torch.manual_seed(1)
    config = QLoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False, task_type=TASK_TYPES[kind], quantize=False
    )
    model = peftkit.get_peft_model(quantized(kind, **options), config)
    _randomise_heads(model)
    return model.eval()


def test_peftkit_adapter_loads_in_peft_on_the_4bit_base(kind: str, tmp_path: Path) -> None:
    ours = _ours(kind)
    ours.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"

    theirs = peft.PeftModel.from_pretrained(loaded_in_4bit(kind, tmp_path / "base"), tmp_path / "adapter").eval()

    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules()), (
        "PEFT uses its 4-bit LoRA layers"
    )
    torch.testing.assert_close(logits(theirs, sample_inputs(kind)), logits(ours, sample_inputs(kind)), **EXACT)


def test_peft_4bit_adapter_loads_in_peftkit(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type=TASK_TYPES[kind])
    theirs = peft.get_peft_model(loaded_in_4bit(kind, tmp_path / "base"), config)
    _randomise_heads(theirs)
    theirs.eval().save_pretrained(tmp_path / "adapter")

    ours = peftkit.PeftModel.from_pretrained(quantized(kind), tmp_path / "adapter").eval()

    assert "QuantLoraLinear" in layer_types(ours)
    torch.testing.assert_close(logits(ours, sample_inputs(kind)), logits(theirs, sample_inputs(kind)), **EXACT)


def test_adapter_loads_on_an_unquantized_base_in_both(kind: str, tmp_path: Path) -> None:
    ours = _ours(kind)
    ours.save_pretrained(tmp_path)
    inputs = sample_inputs(kind)

    dense_ours = peftkit.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    dense_theirs = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path)

    assert "Linear4bit" not in layer_types(dense_ours) and "QuantLoraLinear" not in layer_types(dense_ours)
    torch.testing.assert_close(logits(dense_ours, inputs), logits(dense_theirs, inputs), **EXACT)
    assert not torch.allclose(logits(dense_ours, inputs), logits(ours, inputs), atol=1e-3), "the base differs"


def test_bf16_compute_agrees_with_peft(tmp_path: Path) -> None:
    ours = _ours("llama", bnb_4bit_compute_dtype=torch.bfloat16)
    ours.save_pretrained(tmp_path / "adapter")
    base = loaded_in_4bit("llama", tmp_path / "base", bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(
        logits(ours, sample_inputs("llama")), logits(theirs, sample_inputs("llama")), rtol=0, atol=0.1
    )


def test_requantizing_merge_matches_peft_merge(tmp_path: Path) -> None:
    """PEFT's merge into a 4-bit layer always requantizes; peftkit does the same only when asked."""
    ours = _ours("llama")
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(loaded_in_4bit("llama", tmp_path / "base"), tmp_path / "adapter")

    their_merged = theirs.merge_and_unload()
    our_merged = merge_and_unload(ours, requantize=True)

    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(our_merged, inputs), logits(their_merged, inputs), **EXACT)


def test_lora_config_and_qlora_config_save_the_same_file(tmp_path: Path) -> None:
    options = {"r": 4, "target_modules": "all-linear"}
    peftkit.get_peft_model(tiny_model("llama"), QLoraConfig(**options)).save_pretrained(tmp_path / "q")
    peftkit.get_peft_model(tiny_model("llama"), LoraConfig(**options)).save_pretrained(tmp_path / "l")
    read = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("q", "l")]
    assert read[0] == read[1]
