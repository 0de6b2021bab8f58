"""LoRA on plain torch modules and each layer type, and the config options that shape it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fresh, logits
from torch import nn

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_lora import LoraConfig
from peftkit_lora.layers import LoraConv2d, LoraEmbedding, LoraLinear


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        image = self.embed(tokens).permute(0, 3, 1, 2)  # (batch, 3, h, w)
        return self.head(self.pool(torch.relu(self.conv(image))).flatten(1))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_mlp_noop_at_init_then_trains_only_lora() -> None:
    x = torch.randn(5, 6)
    reference = mlp()(x)
    model = peftkit.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0", "2"]))
    torch.testing.assert_close(model(x), reference)
    assert isinstance(model.base_model[0], LoraLinear) and isinstance(model.base_model[4], nn.Linear)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B = 0 at init, so A only moves from the second step
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if ".lora_" in n}


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_cnn_embedding_conv_linear_merge_equals_unmerged(init: bool | str) -> None:
    tokens = torch.randint(0, 10, (2, 5, 5))
    model = peftkit.get_peft_model(TinyCNN(), LoraConfig(r=2, target_modules=["embed", "conv", "head"], init_lora_weights=init))
    if init == "gaussian":  # B starts at zero: give it values so the merge has something to fold
        for layer in (model.base_model.conv, model.base_model.head):
            nn.init.normal_(layer.lora_B["default"].weight)
    assert isinstance(model.base_model.embed, LoraEmbedding) and isinstance(model.base_model.conv, LoraConv2d)
    unmerged = model(tokens)
    assert not torch.allclose(unmerged, TinyCNN()(tokens))
    model.merge_adapter()
    torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.conv) is nn.Conv2d and type(merged.embed) is nn.Embedding
    torch.testing.assert_close(merged(tokens), unmerged, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out_merge() -> None:
    inputs = sample_inputs("gpt2")
    model = peftkit.get_peft_model(fresh("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)).eval()
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A["default"].weight.shape == (4, 16)
    unmerged = logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_applies_in_train_mode_only() -> None:
    x = torch.randn(4, 6)
    model = peftkit.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_scaling_alpha_rslora_and_patterns() -> None:
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["0", "2"], rank_pattern={"2": 2}, alpha_pattern={"2": 4})
    model = peftkit.get_peft_model(mlp(), config)
    first, second = model.base_model[0], model.base_model[2]
    assert first.r["default"] == 4 and first.scaling["default"] == pytest.approx(8 / 2)
    assert second.r["default"] == 2 and second.scaling["default"] == pytest.approx(4 / 2**0.5)
    assert second.lora_A["default"].weight.shape == (2, 16)


def test_targeting_rules() -> None:
    def targets(**options: object) -> set[str]:
        model = peftkit.get_peft_model(fresh("llama"), LoraConfig(r=2, **options))
        return {n for n, m in model.base_model.named_modules() if isinstance(m, LoraLinear)}

    all_linear = targets(target_modules="all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 2 * 7
    assert targets(target_modules=r".*\.1\.self_attn\.(q|v)_proj") == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert targets(target_modules=["q_proj"], layers_to_transform=[0]) == {"model.layers.0.self_attn.q_proj"}
    assert "model.layers.0.mlp.down_proj" not in targets(target_modules="all-linear", exclude_modules=["down_proj"])


def test_bias_lora_only_trains_saves_and_unload_restores(tmp_path: Path) -> None:
    base = fresh("bert")
    original = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("bias")}
    model = peftkit.get_peft_model(base, LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
    bias = model.base_model.bert.encoder.layer[0].attention.self.query.base_layer.bias
    assert bias.requires_grad
    with torch.no_grad():
        bias.add_(1.0)
    keys = set(model.adapter_state_dict("default"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    restored = model.unload()
    for name, value in original.items():
        torch.testing.assert_close(restored.get_parameter(name), value, rtol=0, atol=0)


def test_unsupported_target_is_a_clear_error() -> None:
    with pytest.raises(peftkit.InjectError, match="LayerNorm"):
        peftkit.get_peft_model(fresh("bert"), LoraConfig(target_modules=["LayerNorm"]))
    with pytest.raises(peftkit.InjectError, match="matched no module"):
        peftkit.get_peft_model(mlp(), LoraConfig(target_modules=["nope"]))
