"""Several adapters on one model: switching, disabling, deleting, mixed batches, merging, Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TASK_TYPES, fresh, logits, three_rows

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_lora import LoraConfig
from peftkit_lora.layers import LoraLinear, MixedRows


def two_adapters(kind: str, tmp_path: Path) -> tuple[peftkit.PeftModel, dict[str, torch.Tensor]]:
    """A model with adapters "default" and "other", each saved alone, and each one's logits alone."""
    inputs = three_rows(kind)
    alone = {}
    for seed, name in ((1, "default"), (2, "other")):
        torch.manual_seed(seed)
        single = peftkit.get_peft_model(fresh(kind), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type=TASK_TYPES[kind]))
        with torch.no_grad():
            for pname, param in single.named_parameters():
                if ".modules_to_save." in pname:
                    param.add_(torch.randn_like(param))
        single.save_pretrained(tmp_path / name)
        alone[name] = logits(single.eval(), inputs)
    model = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path / "default")
    model.load_adapter(tmp_path / "other", adapter_name="other")
    alone["__base__"] = logits(fresh(kind).eval(), inputs)
    return model.eval(), alone


def test_set_disable_delete(kind: str, tmp_path: Path) -> None:
    model, alone = two_adapters(kind, tmp_path)
    inputs = three_rows(kind)
    torch.testing.assert_close(logits(model, inputs), alone["default"], rtol=0, atol=0)
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, inputs), alone["other"], rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), alone["__base__"], rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), alone["other"], rtol=0, atol=0)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert not any(".other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, inputs), alone["default"], rtol=0, atol=0)


def test_mixed_batch_matches_each_adapter_alone(kind: str, tmp_path: Path) -> None:
    model, alone = two_adapters(kind, tmp_path)
    inputs = three_rows(kind)
    names = ["other", "__base__", "default"]
    mixed = logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-4)  # float32, summed in another order
    torch.testing.assert_close(logits(model, inputs), alone["default"], rtol=0, atol=0)  # no rows left behind


def test_mixed_batch_with_other_ranks_and_targets() -> None:
    """Adapters of different ranks, one of them on fewer layers: each row still gets exactly its own adapter."""
    inputs = three_rows("llama")
    torch.manual_seed(3)
    model = peftkit.get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = logits(model, inputs)
    with model.disable_adapter():
        alone["__base__"] = logits(model, inputs)
    names = ["other", "default", "__base__"]
    mixed = logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-4)  # float32, summed in another order


def test_mixed_batch_inference_runs_fused_except_where_dropout_applies() -> None:
    """Without gradients the layer computes all rows in three products (no base module call); in training mode dropout
    still applies to every row's LoRA input, so the per-adapter path runs and two calls differ."""
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False)
    model = peftkit.get_peft_model(fresh("llama"), config)
    model.add_adapter("other", LoraConfig(r=2, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    rows = MixedRows({"default": torch.tensor([0]), "other": torch.tensor([1]), "__base__": torch.tensor([2])})
    x = torch.randn(3, 5, layer.in_features)
    inputs, names = three_rows("llama"), ["other", "default", "__base__"]
    with torch.no_grad():
        model.eval()
        assert layer._mixed_inference(x, rows) is not None
        assert layer._mixed_inference(x.double(), rows) is None, "other dtypes take the plain path"
        model.train()
        assert layer._mixed_inference(x, rows) is None
        first, second = (model(**inputs, adapter_names=names).logits for _ in range(2))
    assert not torch.equal(first[:2], second[:2]), "training-mode dropout on the adapters' rows"
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)  # the base row has no dropout


def test_mixed_batch_gradients_reach_each_rows_adapter() -> None:
    inputs = three_rows("llama")
    torch.manual_seed(4)
    model = peftkit.get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    names = ["other", "default", "other"]
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for param in lora_params:
        param.requires_grad_(True)  # both adapters train (only the active one does by default)
    model(**inputs, adapter_names=names).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad()
    for name in ("default", "other"):
        model.set_adapter(name)
        for param in lora_params:
            param.requires_grad_(True)
        rows = [i for i, n in enumerate(names) if n == name]
        model(**{k: v[rows] for k, v in inputs.items()}).logits.sum().backward()
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            torch.testing.assert_close(mixed[pname], param.grad, atol=1e-4, rtol=5e-4, msg=lambda m, pname=pname: f"{pname}: {m}")


def test_mixed_batch_errors(tmp_path: Path) -> None:
    model, _ = two_adapters("llama", tmp_path)
    inputs = sample_inputs("llama")
    with pytest.raises(ValueError, match="entries but the batch has"):
        model(**inputs, adapter_names=["default"])
    with pytest.raises(KeyError, match="no adapter named 'missing'"):
        model(**inputs, adapter_names=["missing"] * inputs["input_ids"].shape[0])
    model.merge_adapter()
    with pytest.raises(peftkit.MergeError, match="merged"):
        model(**inputs, adapter_names=["default"] * inputs["input_ids"].shape[0])


def test_generate_with_adapter_per_row(tmp_path: Path) -> None:
    model, _ = two_adapters("llama", tmp_path)
    prompt = sample_inputs("llama")["input_ids"][:2]
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "other"], max_new_tokens=4, do_sample=False)
    first = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    model.set_adapter("other")
    second = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(mixed[0], first[0])
    torch.testing.assert_close(mixed[1], second[1])


def test_merge_and_unload_keeps_function_and_drops_wrappers(kind: str, tmp_path: Path) -> None:
    model, alone = two_adapters(kind, tmp_path)
    model.set_adapter("other")
    merged = model.merge_and_unload()
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, three_rows(kind)), alone["other"], atol=1e-5, rtol=1e-5)


def test_only_active_adapter_trains_and_is_trainable(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(fresh("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.set_adapter("second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)


def test_trainer_trains_unchanged(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = peftkit.get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, 64, (16, 8))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)


def test_generate_with_adapter_per_row_and_beams(tmp_path: Path) -> None:
    model, _ = two_adapters("llama", tmp_path)
    prompt = sample_inputs("llama")["input_ids"][:2]
    options = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "other"], **options)
    first = model.generate(input_ids=prompt, **options)
    model.set_adapter("other")
    second = model.generate(input_ids=prompt, **options)
    torch.testing.assert_close(mixed[:2], first[:2])  # prompt 0's two returned sequences
    torch.testing.assert_close(mixed[2:], second[2:])
