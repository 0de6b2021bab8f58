"""Tiny real models and helpers for the P-tuning v2 tests."""

from __future__ import annotations

from typing import Any

import torch
import transformers

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_ptuning_v2 import PTuningV2Config

TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
    "bert-tokens": "TOKEN_CLS",
}
VIRTUAL = 3


def fresh(kind: str) -> torch.nn.Module:
    """The same randomly initialised base model every call ("bert-tokens": BertForTokenClassification)."""
    if kind != "bert-tokens":
        return tiny_model(kind)
    config = tiny_model("bert").config
    config.num_labels = 3
    torch.manual_seed(0)
    return transformers.BertForTokenClassification(config).eval()


def inputs_for(kind: str, labels: bool = False) -> dict[str, torch.Tensor]:
    inputs = sample_inputs("bert" if kind == "bert-tokens" else kind, labels=labels)
    if labels and kind == "bert-tokens":
        inputs["labels"] = torch.randint(0, 3, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    return inputs


def prompted(kind: str, seed: int = 1, **options: Any) -> peftkit.PeftModel:
    torch.manual_seed(seed)
    config = PTuningV2Config(num_virtual_tokens=VIRTUAL, task_type=TASK_TYPES[kind], **options)
    return peftkit.get_peft_model(fresh(kind), config).eval()


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, **extra).logits
