"""Quantizing the base: which layers, which format, the same bits as transformers, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import FP32, layer_types, loaded_in_4bit, logits, quantized

import peftkit
from peftkit import InjectError
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_qlora import BitsAndBytesUnavailableError, QLoraConfig, QuantizationError, quantize_model
from peftkit_qlora.quantize import dequantized_weight

FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_quantize_model_formats(quant_type: str, double_quant: bool, compute: torch.dtype) -> None:
    model = quantize_model(
        tiny_model("llama"),
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7, "every attention and MLP projection is quantized"
    for layer in layers.values():
        assert layer.weight.quant_type == quant_type
        assert layer.weight.quant_state.nested == double_quant
        assert layer.compute_dtype == compute
    assert type(model.lm_head) is torch.nn.Linear, "the output head stays dense"
    dense = dict(tiny_model("llama").named_modules())
    for name, layer in layers.items():
        original = dense[name].weight.detach()
        error = torch.linalg.norm(dequantized_weight(layer) - original) / torch.linalg.norm(original)
        assert 0 < error < 0.4, f"{name}: 4-bit weights are {error:.3f} away from the dense ones (relative)"


def test_same_bits_as_transformers_bitsandbytes_loading(kind: str, tmp_path: Path) -> None:
    ours = quantized(kind)
    theirs = loaded_in_4bit(kind, tmp_path)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(reference), "the same layers are quantized, with the same quant-state entries"
    different = [k for k, v in reference.items() if not torch.equal(mine[k], v)]
    assert not different, f"tensors differ from transformers' 4-bit load: {different[:4]}"
    torch.testing.assert_close(logits(ours, sample_inputs(kind)), logits(theirs, sample_inputs(kind)), rtol=0, atol=0)


def test_task_heads_and_keep_in_fp32_modules_stay_dense() -> None:
    bert = quantized("bert")
    assert type(bert.classifier) is torch.nn.Linear
    t5 = quantized("t5")
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear, (
        "T5's wo is kept in fp32 by transformers"
    )
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)


def test_gpt2_conv1d_becomes_linear4bit() -> None:
    model = quantized("gpt2")
    attention = model.transformer.h[0].attn.c_attn
    assert isinstance(attention, bnb.nn.Linear4bit)
    assert (attention.in_features, attention.out_features) == (16, 48)


def test_int8_base() -> None:
    model = quantize_model(tiny_model("llama"), load_in_8bit=True)
    assert "Linear8bitLt" in layer_types(model) and "Linear4bit" not in layer_types(model)
    base = logits(tiny_model("llama"), sample_inputs("llama"))
    error = torch.linalg.norm(logits(model, sample_inputs("llama")) - base) / torch.linalg.norm(base)
    assert error < 0.05, f"LLM.int8 logits are {error:.4f} away from the dense ones (relative)"


def test_qlora_config_quantizes_then_lora_injects(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), QLoraConfig(r=4, target_modules="all-linear", **FP32))
    assert {"Linear4bit", "QuantLoraLinear"} <= layer_types(model)
    assert all(p.dtype == torch.float32 for p in model._adapters["default"].parameters()), (
        "LoRA master weights are fp32"
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not set(config) & set(QLoraConfig.QUANTIZATION_FIELDS), "the adapter file is plain LoRA"


def test_plain_lora_over_quantized_base_uses_compute_dtype() -> None:
    model = peftkit.get_peft_model(
        quantized("llama", bnb_4bit_compute_dtype=torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"])
    )
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QuantLoraLinear"
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16)
    assert layer.delta("default", x).dtype == torch.bfloat16, "the delta runs in the compute dtype"
    assert layer(x).dtype == torch.float32, "and comes back in the input's dtype"


def test_quantizing_twice_is_an_error(tmp_path: Path) -> None:
    model = quantized("llama")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(QuantizationError, match=r"QLoraConfig\(quantize=False\)"):
        peftkit.get_peft_model(loaded_in_4bit("llama", tmp_path), QLoraConfig(target_modules="all-linear"))
    adapted = peftkit.get_peft_model(model, QLoraConfig(r=4, target_modules="all-linear", quantize=False))
    with pytest.raises(QuantizationError, match="already carries adapters"):
        adapted.add_adapter("second", QLoraConfig(target_modules="all-linear"))
    assert "second" not in adapted.peft_config


def test_failed_inject_leaves_the_model_unquantized() -> None:
    model = tiny_model("llama")
    with pytest.raises(InjectError):
        peftkit.get_peft_model(model, QLoraConfig(target_modules=["no_such_module"]))
    assert "Linear4bit" not in layer_types(model)
    torch.testing.assert_close(
        logits(model, sample_inputs("llama")), logits(tiny_model("llama"), sample_inputs("llama"))
    )


def test_missing_bitsandbytes_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what Python does when the package is absent
    model = tiny_model("llama")
    with pytest.raises(BitsAndBytesUnavailableError, match="pip install 'bitsandbytes>=0.45'"):
        peftkit.get_peft_model(model, QLoraConfig(target_modules="all-linear"))
    with pytest.raises(ImportError, match="pip install"):
        quantize_model(model)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(peftkit.ConfigError, match="bnb_4bit_quant_type"):
        QLoraConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(peftkit.ConfigError, match="bnb_4bit_compute_dtype"):
        QLoraConfig(bnb_4bit_compute_dtype="float64")
    assert QLoraConfig(bnb_4bit_compute_dtype=torch.bfloat16).bnb_4bit_compute_dtype == "bfloat16"
    with pytest.raises(QuantizationError, match="compute dtype"):
        quantize_model(tiny_model("llama"), bnb_4bit_compute_dtype="half-ish")


def test_plugin_import_loads_neither_torch_nor_bitsandbytes() -> None:
    code = (
        "import sys, peftkit_qlora, peftkit_qlora.plugin; print('torch' in sys.modules, 'bitsandbytes' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
