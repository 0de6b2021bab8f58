"""(IA)^3 semantics: which side each vector scales, layer types, exact unmerge, config rules and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ia3_helpers import fresh, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_ia3 import IA3Config
from peftkit_ia3.layers import IA3Conv2d, IA3Linear


class Net(nn.Module):
    """A Linear, a GPT-2 Conv1D and a grouped Conv2d, each targetable by name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 8)
        self.conv1d = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight (8, 12)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        features = self.grouped(self.conv(image)).mean((2, 3))
        return self.conv1d(self.linear(x)).mean(1) + features.sum(-1, keepdim=True)


def net_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 5, 6, generator=generator), "image": torch.randn(2, 3, 5, 5, generator=generator)}


@pytest.mark.parametrize("feedforward", [False, True])
def test_vector_scales_output_or_input(feedforward: bool) -> None:
    base = nn.Linear(6, 8)
    layer = IA3Linear(base)
    layer.add_adapter("a", feedforward=feedforward, init_ones=False)
    layer.active = "a"
    x = torch.randn(3, 6)
    vector = layer.ia3_l["a"]
    assert vector.shape == ((1, 6) if feedforward else (8, 1))
    expected = base(x * vector.flatten()) if feedforward else base(x) * vector.flatten()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_conv1d_and_conv2d_shapes_and_merge(tmp_path: Path) -> None:
    inputs = net_inputs()
    reference = Net()(**inputs)
    config = IA3Config(
        target_modules=["linear", "conv1d", "conv", "grouped"], feedforward_modules=["conv1d", "grouped"]
    )
    model = peftkit.get_peft_model(Net(), config)
    torch.testing.assert_close(model(**inputs), reference, rtol=0, atol=0)  # ones at init: a no-op
    layers = model.base_model
    assert isinstance(layers.conv1d, IA3Linear) and isinstance(layers.conv, IA3Conv2d)
    shapes = {name: tuple(t.shape) for name, t in model.adapter_state_dict("default").items()}
    assert shapes == {
        "base_model.model.linear.ia3_l": (8, 1),
        "base_model.model.conv1d.ia3_l": (1, 8),
        "base_model.model.conv.ia3_l": (1, 4, 1, 1),
        "base_model.model.grouped.ia3_l": (1, 4, 1, 1),
    }
    assert model.peft_config["default"].fan_in_fan_out, "a Conv1D target is recorded as fan_in_fan_out, as PEFT does"

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.uniform_(0.5, 1.5)
    adapted = model(**inputs)
    assert not torch.allclose(adapted, reference)
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(**inputs), adapted, rtol=0, atol=0)


def test_unmerge_is_exact_even_with_zero_factors() -> None:
    """PEFT unmerges by dividing (inexact, and lossy where a factor is 0); peftkit restores the saved weights."""
    inputs = sample_inputs("llama")
    model = peftkit.get_peft_model(fresh("llama"), IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param[..., 0] = 0.0
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "ia3_l" not in k}
    adapted = logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    after = model.base_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "unmerge did not restore the weights bit for bit"
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)


def test_defaults_are_resolved_and_saved(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(fresh("llama"), IA3Config(task_type="CAUSAL_LM"))
    assert sorted(model.peft_config["default"].target_modules) == ["down_proj", "k_proj", "v_proj"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"] == ["down_proj"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 6 and all(n.endswith("ia3_l.default") for n in trainable)
    fewer = peftkit.get_peft_model(fresh("llama"), IA3Config(exclude_modules=["model.layers.0.self_attn.k_proj"]))
    assert len(fewer.adapter_state_dict("default")) == 5


def test_feedforward_list_matches_name_ends_like_peft() -> None:
    """PEFT's list rule for feedforward_modules is a plain ``endswith`` (no dot boundary): "o" also matches "wo"."""
    model = peftkit.get_peft_model(fresh("t5"), IA3Config(target_modules=["o", "wo"], feedforward_modules=["o"]))
    state = model.adapter_state_dict("default")
    assert state["base_model.model.encoder.block.0.layer.1.DenseReluDense.wo.ia3_l"].shape == (1, 32)
    assert state["base_model.model.encoder.block.0.layer.0.SelfAttention.o.ia3_l"].shape == (1, 16)


def test_unknown_architecture_needs_target_modules() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(peftkit.InjectError, match="no default target_modules.*set target_modules"):
        peftkit.get_peft_model(mlp, IA3Config())
    model = peftkit.get_peft_model(mlp, IA3Config(target_modules=["0", "2"]))
    assert model.peft_config["default"].feedforward_modules == []


def test_config_errors() -> None:
    with pytest.raises(peftkit.ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    with pytest.raises(peftkit.ConfigError, match="does not support"):
        IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["k"], "use_something_new": True})
    with pytest.raises(peftkit.InjectError, match="cannot adapt"):
        peftkit.get_peft_model(fresh("llama"), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(peftkit.InjectError, match="matched no module"):
        peftkit.get_peft_model(fresh("llama"), IA3Config(target_modules=["nope"]))


def test_two_adapters_switch_and_mixed_batch() -> None:
    inputs = {k: torch.cat([v, v[:1]]) for k, v in sample_inputs("gpt2").items()}
    torch.manual_seed(1)
    model = peftkit.get_peft_model(fresh("gpt2"), IA3Config(init_ia3_weights=False))
    torch.manual_seed(2)
    model.add_adapter(
        "other", IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False)
    )
    first = logits(model, inputs)
    model.set_adapter("other")
    second = logits(model, inputs)
    base = logits(fresh("gpt2"), inputs)
    mixed = logits(model, inputs, adapter_names=["default", "__base__", "other"])
    torch.testing.assert_close(mixed[0], first[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], second[2], rtol=0, atol=0)
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, inputs), second, rtol=0, atol=0)
