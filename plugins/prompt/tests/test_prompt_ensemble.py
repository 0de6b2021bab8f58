"""Prompt ensembles (num_prompts > 1): K prompts trained in one batch, their logits averaged."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

import peftkit
from peftkit_prompt import PromptTuningConfig
from peftkit_prompt.calls import VirtualTokenInputError
from peftkit_prompt.testing.models import KINDS, TASK_TYPES, generate_by_forward, inputs, randomise_heads, tiny

PROMPTS, N = 3, 2


def ensemble(kind: str) -> peftkit.PeftModel:
    torch.manual_seed(1)
    model = peftkit.get_peft_model(
        tiny(kind), PromptTuningConfig(num_virtual_tokens=N, num_prompts=PROMPTS, task_type=TASK_TYPES[kind])
    )
    randomise_heads(model)
    return model.eval()


def members(model: peftkit.PeftModel, kind: str) -> list[peftkit.PeftModel]:
    """One single-prompt model per prompt of the ensemble, with the same weights and heads."""
    prompts = model.base_model.peftkit_virtual_tokens["default"].table().detach()
    singles = []
    for prompt in prompts:
        single = peftkit.get_peft_model(
            tiny(kind), PromptTuningConfig(num_virtual_tokens=N, task_type=TASK_TYPES[kind])
        )
        randomise_heads(single)
        with torch.no_grad():
            single.base_model.peftkit_virtual_tokens["default"].embedding.weight.copy_(prompt)
        singles.append(single.eval())
    return singles


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_loss_are_the_means_over_prompts(kind: str) -> None:
    batch = inputs(kind, labels=True)
    model = ensemble(kind)
    with torch.no_grad():
        output = model(**batch)
        singles = [single(**batch) for single in members(model, kind)]
    torch.testing.assert_close(output.logits, torch.stack([s.logits for s in singles]).mean(0))
    torch.testing.assert_close(output.loss, torch.stack([s.loss for s in singles]).mean(0))
    assert output.logits.shape == tiny(kind)(**inputs(kind)).logits.shape


def test_every_prompt_trains_in_one_batch() -> None:
    batch = inputs("llama", labels=True)
    model = ensemble("llama").train()
    model(**batch).loss.backward()
    grads = model.base_model.peftkit_virtual_tokens["default"].embedding.weight.grad.view(PROMPTS, N, -1)
    for prompt, single in enumerate(members(model, "llama")):
        single.train()(**batch).loss.backward()
        alone = single.base_model.peftkit_virtual_tokens["default"].embedding.weight.grad
        torch.testing.assert_close(grads[prompt], alone / PROMPTS)  # d(mean of K losses) / d(prompt k)


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_follows_the_averaged_logits(kind: str, use_cache: bool) -> None:
    model = ensemble(kind)
    prompt = {k: v for k, v in inputs(kind).items() if k in ("input_ids", "attention_mask")}
    expected = generate_by_forward(model, kind, prompt, 3, sample=False)
    tokens = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=use_cache)
    assert torch.equal(tokens, expected)
    with pytest.raises(VirtualTokenInputError, match="beam search"):
        model.generate(**prompt, max_new_tokens=3, num_beams=2)


def test_ensemble_adapters_are_peftkit_only(tmp_path: Path) -> None:
    batch = inputs("gpt2")
    model = ensemble("gpt2")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_prompts"] == PROMPTS
    loaded = peftkit.PeftModel.from_pretrained(tiny("gpt2"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    with pytest.warns(UserWarning, match="num_prompts"), pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path)
