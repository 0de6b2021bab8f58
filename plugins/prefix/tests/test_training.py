"""Training: gradient checkpointing, the reparameterisation MLP, and prefix tuning next to LoRA on one model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TASK_TYPES, fresh, inputs_for, logits
from safetensors.torch import load_file

import peftkit
from peftkit import MergeError
from peftkit_prefix import PrefixTuningConfig


def labelled(kind: str) -> dict[str, torch.Tensor]:
    inputs = inputs_for(kind, labels=True)
    if kind == "bert-tokens":
        inputs["labels"] = torch.randint(0, 3, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    return inputs


def loss_and_grads(kind: str, projection: bool, checkpointing: dict | None) -> tuple[float, dict[str, torch.Tensor]]:
    base = fresh(kind)
    torch.manual_seed(1)
    config = PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK_TYPES[kind], prefix_projection=projection)
    model = peftkit.get_peft_model(base, config)
    if checkpointing is not None:  # through the wrapper, as a user (or transformers.Trainer) would
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.train()
    loss = model(**labelled(kind)).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind: str, projection: bool, reentrant: bool) -> None:
    expected_loss, expected = loss_and_grads(kind, projection, None)
    loss, grads = loss_and_grads(kind, projection, {"use_reentrant": reentrant})
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert sorted(grads) == sorted(expected)
    prefix_grads = [g for n, g in grads.items() if "peftkit_prefixes" in n]
    assert prefix_grads and all(g is not None and g.abs().sum() > 0 for g in prefix_grads)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_projection_trains_the_mlp_and_saves_only_the_prefixes(tmp_path: Path) -> None:
    inputs = inputs_for("gpt2")
    model = peftkit.get_peft_model(
        fresh("gpt2"), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12)
    )
    trainable = sorted(n.split("default.")[1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "embedding.weight",
        "transform.0.bias",
        "transform.0.weight",
        "transform.2.bias",
        "transform.2.weight",
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**inputs_for("gpt2", labels=True)).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    loaded = peftkit.PeftModel.from_pretrained(fresh("gpt2"), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "peftkit_prefixes" in n] == [
        "base_model.peftkit_prefixes.default.embedding.weight"
    ]
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_trainer_with_gradient_checkpointing_trains_the_prefixes(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = peftkit.get_peft_model(fresh("llama"), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    before = model.adapter_state_dict("default")["prompt_embeddings"].clone()
    inputs = inputs_for("llama", labels=True)
    rows = [{key: value[i] for key, value in inputs.items()} for i in range(2)]
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        gradient_checkpointing=True,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert not torch.equal(model.adapter_state_dict("default")["prompt_embeddings"], before)


def test_zero_init_is_not_a_no_op_but_is_zero() -> None:
    model = peftkit.get_peft_model(fresh("llama"), PrefixTuningConfig(num_virtual_tokens=3, init_weights="zero"))
    assert not model.adapter_state_dict("default")["prompt_embeddings"].any()
    assert peftkit.get_registry().method("prefix_tuning").noop_at_init is False


def test_lora_and_prefix_tuning_as_two_adapters_on_one_model(tmp_path: Path) -> None:
    if "lora" not in peftkit.get_registry().methods:
        pytest.skip("needs the peftkit-lora plugin")
    LoraConfig = peftkit.get_registry().method("lora").config_class

    inputs = inputs_for("llama")
    base_logits = logits(fresh("llama"), inputs)
    model = peftkit.get_peft_model(
        fresh("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    lora_logits = logits(model, inputs)
    torch.manual_seed(3)
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3))
    torch.testing.assert_close(
        logits(model, inputs), lora_logits, msg="adding an inactive prefix adapter changed LoRA's outputs"
    )

    model.set_adapter("prefix")
    prefix_logits = logits(model, inputs)
    alone = peftkit.get_peft_model(fresh("llama"), PrefixTuningConfig(num_virtual_tokens=3))
    alone.load_adapter(_saved(model, "prefix", tmp_path), adapter_name="copy")
    alone.set_adapter("copy")
    torch.testing.assert_close(
        prefix_logits, logits(alone, inputs), msg="LoRA leaked into the prefix adapter's outputs"
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.peftkit_prefixes.prefix.embedding.weight"
    }
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 9)

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_logits)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), lora_logits)
    with pytest.raises(ValueError, match="does not support mixed batches"):
        model(**inputs, adapter_names=["default", "prefix"])
    model.set_adapter("prefix")
    with pytest.raises(MergeError, match="cannot merge"):
        model.merge_adapter()
    model.delete_adapter("prefix")
    assert not hasattr(model.base_model, "peftkit_prefixes")
    torch.testing.assert_close(logits(model, inputs), lora_logits)


def _saved(model: peftkit.PeftModel, name: str, tmp_path: Path) -> Path:
    model.save_pretrained(tmp_path, selected_adapters=[name])
    return tmp_path / name
