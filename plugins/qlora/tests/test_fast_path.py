"""The fused quantized LoRA layer: the same outputs and gradients as bitsandbytes' matmul plus LoRA's modules."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from conftest import quantized, train, trainable

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_lora.layers import LoraLayer
from peftkit_qlora import dequant, quantize_model
from peftkit_qlora.layers import QuantLoraLinear


def lora_over(base: torch.nn.Module, dropout: float = 0.0) -> peftkit.PeftModel:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return peftkit.get_peft_model(base, config)


def quant_layers(model: torch.nn.Module) -> list[QuantLoraLinear]:
    layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert layers
    return layers


def use_plain_path(model: torch.nn.Module) -> None:
    """bitsandbytes' own 4-bit layer, then LoRA's modules: what the fused function stands in for."""
    for layer in quant_layers(model):
        layer.forward = LoraLayer.forward.__get__(layer)  # type: ignore[method-assign]


def loss_and_grads(model: peftkit.PeftModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**sample_inputs("llama", labels=True)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_training_step_matches_bitsandbytes_plus_lora_modules(dtype: torch.dtype, tolerance: float) -> None:
    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = lora_over(quantize_model(tiny_model("llama").to(dtype), bnb_4bit_compute_dtype=dtype))
        if not fused:
            use_plain_path(model)
        return loss_and_grads(model)

    fused_loss, fused_grads = run(True)
    plain_loss, plain_grads = run(False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=tolerance, atol=tolerance)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        assert grad.dtype == torch.float32, f"{name}: LoRA master weights get float32 gradients"
        scale = plain_grads[name].abs().max().item() + 1e-12
        assert (grad - plain_grads[name]).abs().max().item() <= tolerance * 5 * scale, name


def test_a_weight_rebuilt_in_row_slices_gives_the_same_outputs_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused layer rebuilds a wide weight a slice of rows at a time (forward and backward)."""
    monkeypatch.setattr(dequant, "SLICE_BYTES", 24 * 192 * 4)  # 70 output rows in 3 slices

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(0)
        base = quantize_model(torch.nn.Sequential(torch.nn.Linear(192, 70, bias=True)), bnb_4bit_compute_dtype=torch.float32)
        model = peftkit.get_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
        if not fused:
            use_plain_path(model)
        x = torch.randn(6, 192, requires_grad=True)
        out = model(x)
        (out * torch.linspace(-1, 1, 70)).sum().backward()
        layer = quant_layers(model)[0]
        return out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad

    for fused, plain in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_fused_path_is_the_one_taken_for_many_rows() -> None:
    model = lora_over(quantized("llama"))
    x = torch.randn(2, 5, quant_layers(model)[0].in_features)
    assert all(layer._quantized_fast_path_applies(x, "default") for layer in quant_layers(model))


def test_dropout_trains_and_disabling_restores_the_quantized_base() -> None:
    base = quantized("llama")
    inputs = sample_inputs("llama")
    with torch.no_grad():
        expected = base(**inputs).logits
    model = lora_over(base, dropout=0.1)
    losses = train(model, torch.optim.AdamW(trainable(model), lr=1e-2), steps=4)
    assert losses[-1] < losses[0], losses
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["decoding", "accelerate-hook", "forward-hook", "compute-dtype"])
def test_falls_back_to_bitsandbytes_layer(case: str) -> None:
    model = lora_over(quantized("llama")).eval()
    layer = quant_layers(model)[0]
    seen: list[bool] = []
    x = torch.randn(1, 1 if case == "decoding" else 3, layer.in_features)
    if case == "accelerate-hook":
        add_hook_to_module(layer.base_layer, ModelHook())
    elif case == "forward-hook":
        layer.base_layer.register_forward_hook(lambda *args: seen.append(True))
    elif case == "compute-dtype":
        x = x.to(torch.float64)
    with torch.no_grad():
        assert not layer._quantized_fast_path_applies(x, "default")
        out = layer(x)
        expected = LoraLayer.forward(layer, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert seen or case != "forward-hook"
