"""The rank budget: PEFT's schedule, a budget that really moves, the allocation step's order, the Trainer callback."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from adalora_helpers import (
    SCHEDULE,
    config_fields,
    fresh,
    logits,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread)
    peftkit_model,
    train,
)
from safetensors.torch import load_file

import peftkit
from peftkit.testing.models import sample_inputs
from peftkit_adalora import (
    AdaLoraCallback,
    AllocationError,
    orthogonal_regularization,
    rank_allocator,
    update_and_allocate,
)

SCHEDULES = [
    {"init_r": 12, "target_r": 4, "tinit": 10, "tfinal": 20, "total_step": 100, "deltaT": 5},
    {"init_r": 6, "target_r": 1, "tinit": 0, "tfinal": 0, "total_step": 7, "deltaT": 1},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["long", "short"])
def test_budget_schedule_is_peft_s(schedule: dict) -> None:
    fields = config_fields("llama", target_modules=["q_proj", "v_proj"], **schedule)
    ours = rank_allocator(peftkit_model("llama", **fields))
    theirs = peft.get_peft_model(fresh("llama"), peft.AdaLoraConfig(**fields)).base_model.rankallocator
    steps = range(schedule["total_step"] + 3)
    assert [ours.budget_schedule(s) for s in steps] == [theirs.budget_schedule(s) for s in steps]
    budgets = [ours.budget_schedule(s)[0] for s in steps]
    modules = 4
    assert budgets[: schedule["tinit"] + 1] == [schedule["init_r"] * modules] * (schedule["tinit"] + 1)
    assert budgets == sorted(budgets, reverse=True), "the budget only decreases"
    final = schedule["total_step"] - schedule["tfinal"]
    assert set(budgets[final:]) == {schedule["target_r"] * modules}


def test_budget_moves_between_modules(tmp_path: Path) -> None:
    kind = "llama"
    model = peftkit_model(
        kind,
        init_r=4,
        target_r=2,
        total_step=8,
        tinit=2,
        tfinal=2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    allocator = rank_allocator(model)
    budgets = []
    train(model, kind, 8, allocate=lambda m, step: budgets.append(update_and_allocate(m, step)))

    ranks = allocator.ranks()
    assert budgets[0] == budgets[1] == 4 * len(ranks), "no allocation during the first tinit steps"
    assert budgets[-1] == budgets[-2] == 2 * len(ranks)
    assert sum(ranks.values()) == 2 * len(ranks), "the total rank is the target budget"
    assert len(set(ranks.values())) > 1, f"every module kept the same rank: {ranks}"
    for target, layer in allocator.layers.items():
        kept = model.peft_config["default"].rank_pattern[f"{target}.lora_E"]
        values = layer.lora_E["default"].detach().view(-1)
        assert torch.all(values[~torch.tensor(kept)] == 0), "pruned singular values are zero"
        assert torch.all(values[torch.tensor(kept)] != 0)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {t: saved[f"base_model.model.{t}.lora_E"].shape[0] for t in ranks} == ranks
    loaded = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert {t: layer.lora_A["default"].shape[0] for t, layer in rank_allocator(loaded).layers.items()} == ranks
    torch.testing.assert_close(
        logits(loaded, sample_inputs(kind)), logits(model, sample_inputs(kind)), rtol=1e-5, atol=1e-5
    )


def test_allocating_after_zero_grad_equals_before() -> None:
    models = {}
    for order in ("before_zero_grad", "after_zero_grad"):
        torch.manual_seed(0)
        models[order] = peftkit_model("gpt2")
        train(models[order], "gpt2", SCHEDULE["total_step"], order=order)
    first, second = (m.peft_config["default"].rank_pattern for m in models.values())
    assert first is not None and first == second
    for (name, a), (_, b) in zip(*(m.named_parameters() for m in models.values()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_allocation_without_a_backward_pass_is_an_error() -> None:
    model = peftkit_model("llama")
    with pytest.raises(AllocationError, match="no gradients since its last call"):
        update_and_allocate(model, 1)
    model(**sample_inputs("llama", labels=True)).loss.backward()
    update_and_allocate(model, 1)
    with pytest.raises(AllocationError, match="once per optimizer step"):
        update_and_allocate(model, 2)


def test_loaded_adapter_given_labels_does_not_crash(tmp_path: Path) -> None:
    trained = peftkit_model("llama", init_lora_weights=False)
    trained.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(fresh("llama"), tmp_path).train()
    inputs = sample_inputs("llama", labels=True)
    loss = loaded(**inputs).loss  # PEFT raises here: no trainable adapter for its regulariser
    with torch.no_grad():
        torch.testing.assert_close(loss, trained.eval()(**inputs).loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(AllocationError, match="not trainable"):
        update_and_allocate(loaded, 1)


def test_regulariser_for_a_loss_computed_by_hand() -> None:
    model = peftkit_model("llama").train()
    out = model(**sample_inputs("llama"))  # no labels: no loss, so nothing added automatically
    loss = out.logits.logsumexp(-1).mean() + orthogonal_regularization(model)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), "the regulariser trains Q while Λ = 0"


def test_continued_training_of_a_loaded_adapter_keeps_peft_format(tmp_path: Path) -> None:
    kind = "llama"
    model = peftkit_model(kind)
    train(model, kind, SCHEDULE["total_step"])
    model.save_pretrained(tmp_path / "first")
    resumed = peftkit.PeftModel.from_pretrained(fresh(kind), tmp_path / "first", is_trainable=True)
    train(resumed, kind, SCHEDULE["total_step"])
    assert all(len(m) == SCHEDULE["init_r"] for m in resumed.peft_config["default"].rank_pattern.values())
    resumed.save_pretrained(tmp_path / "second")
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "second")
    torch.testing.assert_close(
        logits(theirs, sample_inputs(kind)), logits(resumed, sample_inputs(kind)), rtol=1e-5, atol=1e-5
    )


def test_trainer_callback(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = peftkit_model("llama", init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1)
    ids = torch.randint(3, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=7,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[AdaLoraCallback()])
    with pytest.warns(UserWarning, match="total_step is 6 but this Trainer runs 7"):
        trainer.train()

    ranks = rank_allocator(model).ranks()
    assert sum(ranks.values()) == 2 * len(ranks)
    assert len(set(ranks.values())) > 1, f"every module kept the same rank: {ranks}"
    for target, layer in rank_allocator(model).layers.items():
        kept = torch.tensor(model.peft_config["default"].rank_pattern[f"{target}.lora_E"])
        assert torch.all(layer.lora_E["default"].detach().view(-1)[~kept] == 0)


def test_gradient_accumulation_scores_the_accumulated_gradient() -> None:
    first, second = sample_inputs("llama", labels=True, seed=1), sample_inputs("llama", labels=True, seed=2)
    scores = []
    for accumulate in (True, False):
        torch.manual_seed(0)
        model = peftkit_model("llama", init_lora_weights=False).train()
        if accumulate:
            model(**first).loss.backward()
            model(**second).loss.backward()
        else:
            (model(**first).loss + model(**second).loss).backward()
        update_and_allocate(model, 1)
        scores.append(rank_allocator(model).triplet_scores())
    for target, score in scores[0].items():
        torch.testing.assert_close(score, scores[1][target], rtol=1e-5, atol=1e-12)
