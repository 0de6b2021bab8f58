"""Merging into quantized layers: dequantize and fold (default), or quantize again on request.

Tolerances (merged against unmerged logits of the tiny models, whose logits
reach about 3): float32 compute 1e-5; float16 1e-2; bfloat16 0.15 (5% of the
largest logit: bf16 keeps 8 significant bits, and one path rounds where the other does not); LLM.int8
in train mode 1e-5, in eval mode 3% relative (the unmerged int8 path also
quantizes the activations, the merged dense one does not).
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers as tf
from conftest import FP32, layer_types, loaded_in_4bit, logits, quantized
from test_quantize import FORMATS

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_qlora import QLoraMergeWarning, QuantizationError, merge_and_unload, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore::peftkit_qlora.QLoraMergeWarning")
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-2, "rtol": 0},
    torch.bfloat16: {"atol": 0.15, "rtol": 0},
}


def trained(base: torch.nn.Module, kind: str = "llama") -> peftkit.PeftModel:
    torch.manual_seed(1)
    task = "SEQ_CLS" if kind == "bert" else None
    return peftkit.get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type=task)
    ).eval()


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS)
def test_merge_unmerge_in_each_format(quant_type: str, double_quant: bool) -> None:
    model = trained(quantized("llama", bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant))
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(QLoraMergeWarning, match="dequantizing them to float32"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), expected, **TOLERANCE[torch.float32])
    model.unmerge_adapter()
    restored = model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in state.items()), (
        "unmerge gives back the quantized weights bit for bit"
    )
    assert all(
        isinstance(m.base_layer, bnb.nn.Linear4bit) for m in model.modules() if type(m).__name__ == "QuantLoraLinear"
    )


@pytest.mark.parametrize("compute", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_and_unload_is_dense(kind: str, compute: torch.dtype) -> None:
    model = trained(quantized(kind, bnb_4bit_compute_dtype=compute), kind)
    inputs = sample_inputs(kind)
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert "Linear4bit" not in layer_types(merged) and "QuantLoraLinear" not in layer_types(merged)
    dense = [m for m in merged.modules() if getattr(m, "peftkit_merged_from", None) is not None]
    assert dense and all(type(m) is torch.nn.Linear for m in dense)
    assert {m.weight.dtype for m in dense} == {torch.float32}, "dense in the dtype of the model's other weights"
    torch.testing.assert_close(logits(merged, inputs), expected, **TOLERANCE[compute])


def test_bf16_model_merges_into_bf16() -> None:
    model = trained(quantize_model(tiny_model("llama").to(torch.bfloat16)))
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}, "the compute dtype, as the rest of the model"
    torch.testing.assert_close(logits(merged, inputs), expected, **TOLERANCE[torch.bfloat16])


def test_disable_adapter_while_merged_gives_the_quantized_base() -> None:
    base_logits = logits(quantized("llama"), sample_inputs("llama"))
    model = trained(quantized("llama"))
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, sample_inputs("llama")), base_logits, rtol=0, atol=0)
    assert model._adapters["default"].merged


def test_requantize_on_request() -> None:
    model = trained(quantized("llama"))
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    with pytest.warns(QLoraMergeWarning, match="requantizing 14 merged layers"):
        merged = merge_and_unload(model, requantize=True)
    layers = [m for m in merged.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    dense = logits(tiny_model("llama"), inputs)
    quantization_error = torch.linalg.norm(logits(quantized("llama"), inputs) - dense) / torch.linalg.norm(dense)
    error = torch.linalg.norm(logits(merged, inputs) - expected) / torch.linalg.norm(expected)
    assert 0 < error < 2 * quantization_error, (
        f"requantizing costs {error:.3f}, quantizing the base {quantization_error:.3f}"
    )


def test_requantizing_merged_weights_needs_an_opt_in() -> None:
    merged = trained(quantized("llama")).merge_and_unload()
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(QuantizationError, match="allow_requantize=True"):
        quantize_model(merged)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in before.items()), "a refused quantize changed nothing"
    quantize_model(merged, allow_requantize=True)
    assert "Linear4bit" in layer_types(merged)


def test_merged_transformers_model_saves_and_reloads_dense(tmp_path: Path) -> None:
    model = trained(loaded_in_4bit("llama", tmp_path / "base"))
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert not getattr(merged, "is_quantized", False) and not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert "Linear4bit" not in layer_types(reloaded), "loading the merged model does not quantize it again"
    torch.testing.assert_close(logits(reloaded, inputs), expected, **TOLERANCE[torch.float32])


def test_requantized_transformers_model_keeps_its_quantization_config(tmp_path: Path) -> None:
    merged = merge_and_unload(trained(loaded_in_4bit("llama", tmp_path)), requantize=True)
    assert merged.is_quantized and merged.config.quantization_config.load_in_4bit


def test_int8_merge() -> None:
    model = trained(quantize_model(tiny_model("llama"), load_in_8bit=True))
    inputs = sample_inputs("llama")
    eval_logits = logits(model, inputs)
    model.train()
    with torch.no_grad():
        train_logits = model(**inputs).logits
        model.merge_adapter()
        merged_train = model(**inputs).logits
    torch.testing.assert_close(merged_train, train_logits, **TOLERANCE[torch.float32])
    error = torch.linalg.norm(logits(model, inputs) - eval_logits) / torch.linalg.norm(eval_logits)
    assert error < 0.03, f"merged vs int8-activation eval outputs: {error:.4f}"
    merged = model.merge_and_unload()
    assert "Linear8bitLt" not in layer_types(merged)
    requantized = merge_and_unload(trained(quantize_model(tiny_model("llama"), load_in_8bit=True)), requantize=True)
    assert "Linear8bitLt" in layer_types(requantized)


def test_merge_into_fresh_adapter_changes_nothing() -> None:
    base_logits = logits(quantized("llama"), sample_inputs("llama"))
    model = peftkit.get_peft_model(quantized("llama"), LoraConfig(r=4, target_modules="all-linear"))
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, sample_inputs("llama")), base_logits, **TOLERANCE[torch.float32])
    assert {p.dtype for p in merged.parameters()} == {FP32["bnb_4bit_compute_dtype"]}
