"""Bottleneck semantics: placement per architecture, sizes, the adapter's math, whole blocks, merging, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_bottleneck import BottleneckConfig
from peftkit_bottleneck.layers import BottleneckLayer

WRAPPED = {  # the houlsby placement on each tiny model (two blocks; T5 has an encoder and a decoder)
    "llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
    "bert": ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
    "t5": [
        "encoder.block.0.layer.0.SelfAttention.o",
        "encoder.block.0.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.0.SelfAttention.o",
        "decoder.block.0.layer.2.DenseReluDense.wo",
    ],
}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]


@pytest.mark.parametrize("kind", list(WRAPPED))
def test_default_placements(kind: str) -> None:
    houlsby = wrapped(peftkit.get_peft_model(tiny_model(kind), BottleneckConfig()).base_model)
    assert len(houlsby) == 2 * len(WRAPPED[kind]) and set(WRAPPED[kind]) <= set(houlsby)
    pfeiffer = wrapped(peftkit.get_peft_model(tiny_model(kind), BottleneckConfig(adapter_type="pfeiffer")).base_model)
    feedforward = [n for n in WRAPPED[kind] if any(s in n for s in ("mlp", "layer.0.output", "DenseReluDense"))]
    assert len(pfeiffer) == len(houlsby) // 2 and set(feedforward) <= set(pfeiffer)
    parallel = wrapped(peftkit.get_peft_model(tiny_model(kind), BottleneckConfig(adapter_type="parallel")).base_model)
    assert parallel == houlsby


def test_sizes_and_saved_format(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), BottleneckConfig(adapter_type="parallel", reduction_factor=4))
    model.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in model.adapter_state_dict("default").items()}
    prefix = "base_model.model.model.layers.0."
    assert shapes[prefix + "self_attn.o_proj.bottleneck.down.weight"] == (4, 16)  # hidden 16 // 4
    assert shapes[prefix + "mlp.down_proj.bottleneck.down.weight"] == (4, 32)  # parallel reads the 32-wide input
    assert shapes[prefix + "mlp.down_proj.bottleneck.up.weight"] == (16, 4)
    assert shapes[prefix + "mlp.down_proj.bottleneck.up.bias"] == (16,)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["adapter_type"] == "parallel"
    assert config["target_modules"] == r"(?:.*\.self_attn\.o_proj)|(?:.*\.mlp\.down_proj)", "the placement is saved"


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "silu", "tanh"])
@pytest.mark.parametrize("adapter_type", ["houlsby", "parallel"])
def test_adapter_math(adapter_type: str, non_linearity: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    layer = BottleneckLayer(base, 8, 12)
    layer.add_adapter("a", 3, non_linearity, adapter_type == "parallel", 0.5, init_zero=False)
    layer.active = "a"
    adapter = layer.bottleneck["a"]
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}.get(non_linearity, nn.functional.silu)
    x = torch.randn(2, 5, 8)
    source = x if adapter_type == "parallel" else base(x)
    expected = base(x) + 0.5 * adapter.up(act(adapter.down(source)))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.active = None
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("adapter_type", ["houlsby", "parallel"])
def test_whole_blocks_as_targets(adapter_type: str) -> None:
    """Llama's attention block returns a tuple and is called with ``hidden_states=``; both work."""
    inputs = sample_inputs("llama")
    expected = logits(tiny_model("llama"), inputs)
    config = BottleneckConfig(adapter_type=adapter_type, reduction_factor=4, target_modules=["self_attn", "mlp"])
    model = peftkit.get_peft_model(tiny_model("llama"), config)
    assert len(wrapped(model.base_model)) == 4
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    assert not torch.allclose(logits(model, inputs), expected)
    assert model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, do_sample=False).shape == (2, 8)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


def test_merge_is_refused_and_unload_restores() -> None:
    inputs = sample_inputs("gpt2")
    base = tiny_model("gpt2")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.get_peft_model(base, BottleneckConfig(init_weights=False))
    assert not peftkit.get_registry().method("bottleneck").mergeable
    with pytest.raises(peftkit.MergeError, match="cannot merge"):
        model.merge_and_unload()
    from peftkit_bottleneck.adapter import BottleneckAdapter

    adapter = model._adapters["default"]
    assert isinstance(adapter, BottleneckAdapter)
    with pytest.raises(peftkit.MergeError, match="non-linearity"):
        peftkit.get_registry().hook.peftkit_merge(adapter=adapter, config=adapter.config, action="merge")
    unloaded = model.unload()
    assert not wrapped(unloaded) and sorted(unloaded.state_dict()) == sorted(state)
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(logits(unloaded, inputs), logits(tiny_model("gpt2"), inputs), rtol=0, atol=0)


def test_plain_module_needs_target_modules() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(peftkit.InjectError, match="no default placement.*set target_modules"):
        peftkit.get_peft_model(mlp, BottleneckConfig())
    x = torch.randn(3, 4)
    expected = mlp(x)
    model = peftkit.get_peft_model(mlp, BottleneckConfig(target_modules=["2"], reduction_factor=2))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_errors() -> None:
    with pytest.raises(peftkit.ConfigError, match="adapter_type"):
        BottleneckConfig(adapter_type="serial")
    with pytest.raises(peftkit.ConfigError, match="non_linearity"):
        BottleneckConfig(non_linearity="softmax")
    with pytest.raises(peftkit.ConfigError, match="reduction_factor"):
        BottleneckConfig(reduction_factor=0)
    with pytest.raises(peftkit.InjectError, match="leaves no bottleneck units"):
        peftkit.get_peft_model(tiny_model("bert"), BottleneckConfig(reduction_factor=32))
    with pytest.raises(peftkit.InjectError, match="cannot adapt"):
        peftkit.get_peft_model(tiny_model("llama"), BottleneckConfig(target_modules=["embed_tokens"]))
    with pytest.raises(peftkit.InjectError, match="inside other targets"):
        peftkit.get_peft_model(tiny_model("llama"), BottleneckConfig(target_modules=["mlp", "down_proj"]))
