"""BitFit semantics: which biases train, what the file holds, exact restore, several adapters, added biases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_bitfit import BitFitConfig


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every module's installed ``bias`` (what the forward pass uses), by module name."""
    return {
        name: module._parameters["bias"].detach().clone()
        for name, module in model.named_modules()
        if module._parameters.get("bias") is not None
    }


def train_step(model: peftkit.PeftModel, kind: str) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**sample_inputs(kind, labels=True)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def test_trains_only_biases_and_file_holds_only_them(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("gpt2"), BitFitConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert any(".ln_1." in n for n in trainable) and any(".c_attn." in n for n in trainable)
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    expected = sorted(f"base_model.model.{n}.bias" for n in model._adapters["default"].targets)
    assert keys == expected and "base_model.model.transformer.h.0.attn.c_attn.bias" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["add_missing_biases"] is False


def test_target_modules_and_task_head() -> None:
    model = peftkit.get_peft_model(
        tiny_model("bert"), BitFitConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    bitfit = [n for n in trainable if "modules_to_save" not in n]
    assert len(bitfit) == 4 and all(".query." in n or ".value." in n for n in bitfit)
    assert any("classifier.modules_to_save.default.weight" in n for n in trainable), "SEQ_CLS trains the head"
    keys = model.adapter_state_dict("default")
    assert (
        "base_model.model.classifier.weight" in keys
        and "base_model.model.bert.encoder.layer.0.attention.self.query.bias" in keys
    )

    excluded = peftkit.get_peft_model(tiny_model("bert"), BitFitConfig(exclude_modules=".*LayerNorm"))
    assert not any("LayerNorm" in t for t in excluded._adapters["default"].targets)


def test_disable_and_unload_restore_original_biases_exactly() -> None:
    base = tiny_model("bert")
    original = biases(base)
    original_params = {
        n: m._parameters["bias"] for n, m in base.named_modules() if m._parameters.get("bias") is not None
    }
    model = peftkit.get_peft_model(base, BitFitConfig())
    train_step(model, "bert")
    trained = biases(model.base_model)
    assert any(not torch.equal(trained[n], v) for n, v in original.items())
    with model.disable_adapter():
        assert all(torch.equal(biases(model.base_model)[n], v) for n, v in original.items())
    assert all(torch.equal(biases(model.base_model)[n], v) for n, v in trained.items())
    unloaded = model.unload()
    assert all(torch.equal(biases(unloaded)[n], v) for n, v in original.items())
    assert all(
        m._parameters.get("bias") is original_params[n] for n, m in unloaded.named_modules() if n in original_params
    )
    assert not any(n.endswith("bitfit") for n, _ in unloaded.named_modules())


def test_merge_makes_biases_permanent_and_unmerge_restores() -> None:
    inputs = sample_inputs("gpt2")
    base = tiny_model("gpt2")
    original = biases(base)
    model = peftkit.get_peft_model(base, BitFitConfig(init_weights=False))
    adapted = logits(model, inputs)
    trained = biases(model.base_model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)
    model.unmerge_adapter()
    for name, module in model.base_model.named_modules():
        if name.endswith(".bitfit"):
            assert torch.equal(module.original, original[name.removesuffix(".bitfit")]), name
    merged = model.merge_and_unload()
    assert all(torch.equal(biases(merged)[n], v) for n, v in trained.items())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=0, atol=0)


def test_several_adapters_keep_their_own_biases(tmp_path: Path) -> None:
    inputs = sample_inputs("gpt2")
    base = tiny_model("gpt2")
    original = biases(base)
    model = peftkit.get_peft_model(base, BitFitConfig())
    train_step(model, "gpt2")
    first = logits(model, inputs)
    model.add_adapter("second", BitFitConfig(target_modules=["c_attn", "c_fc"]))
    model.set_adapter("second")
    torch.testing.assert_close(logits(model, inputs), logits(tiny_model("gpt2"), inputs), rtol=0, atol=0)
    train_step(model, "gpt2")
    second = logits(model, inputs)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), first, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, inputs), second, rtol=0, atol=0)
    with model.disable_adapter():
        assert all(torch.equal(biases(model.base_model)[n], v) for n, v in original.items())
    reloaded = peftkit.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(logits(reloaded, inputs), first, rtol=0, atol=0)
    reloaded.set_adapter("second")
    torch.testing.assert_close(logits(reloaded, inputs), second, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_models_without_biases_need_add_missing_biases(kind: str) -> None:
    with pytest.raises(peftkit.InjectError, match="has no bias parameters.*add_missing_biases=True"):
        peftkit.get_peft_model(tiny_model(kind), BitFitConfig())
    with pytest.raises(peftkit.InjectError, match="have no bias.*add_missing_biases=True"):
        peftkit.get_peft_model(tiny_model(kind), BitFitConfig(target_modules="all-linear"))


def test_added_biases_are_zero_then_removed() -> None:
    inputs = sample_inputs("llama")
    base = tiny_model("llama")
    keys = sorted(base.state_dict())
    expected = logits(base, inputs)
    model = peftkit.get_peft_model(base, BitFitConfig(target_modules=["q_proj", "down_proj"], add_missing_biases=True))
    assert model.base_model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    assert model.base_model.lm_head.bias is None
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    train_step(model, "llama")
    assert not torch.allclose(logits(model, inputs), expected)
    with pytest.raises(peftkit.MergeError, match="added biases"):
        model.merge_adapter()
    unloaded = model.unload()
    assert unloaded.model.layers[0].self_attn.q_proj.bias is None
    assert sorted(unloaded.state_dict()) == keys
    torch.testing.assert_close(logits(unloaded, inputs), expected, rtol=0, atol=0)


def test_add_missing_biases_only_on_linear_layers() -> None:
    targets = (
        peftkit.get_peft_model(tiny_model("llama"), BitFitConfig(add_missing_biases=True))._adapters["default"].targets
    )
    assert len(targets) == 14 and "lm_head" not in targets, "every Linear of the two blocks, never the output head"
    with pytest.raises(peftkit.InjectError, match="input_layernorm.*only Linear and Conv1D"):
        peftkit.get_peft_model(
            tiny_model("llama"), BitFitConfig(target_modules=["input_layernorm"], add_missing_biases=True)
        )
    with pytest.raises(peftkit.InjectError, match="matched no module"):
        peftkit.get_peft_model(tiny_model("gpt2"), BitFitConfig(target_modules=["nope"]))


def test_biases_follow_dtype_moves() -> None:
    inputs = sample_inputs("bert")
    model = peftkit.get_peft_model(tiny_model("bert"), BitFitConfig(init_weights=False)).double()
    with model.disable_adapter():
        base = logits(model, inputs)
        assert all(b.dtype == torch.float64 for b in biases(model.base_model).values())
    assert logits(model, inputs).dtype == torch.float64
    torch.testing.assert_close(base, logits(tiny_model("bert").double(), inputs), rtol=0, atol=0)
