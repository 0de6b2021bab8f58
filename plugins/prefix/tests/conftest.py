"""Tiny real models and helpers for the prefix-tuning tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from peftkit.testing.models import MODEL_KINDS, sample_inputs, tiny_model

TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
    "bert-tokens": "TOKEN_CLS",
}
ALL_KINDS = (*MODEL_KINDS, "bert-tokens")  # plus BertForTokenClassification
DECODERS = ("llama", "gpt2")


@pytest.fixture(params=ALL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def fresh(kind: str) -> torch.nn.Module:
    """The same randomly initialised base model every call."""
    if kind != "bert-tokens":
        return tiny_model(kind)
    config = tiny_model("bert").config
    config.num_labels = 3
    torch.manual_seed(0)
    return transformers.BertForTokenClassification(config).eval()


def inputs_for(kind: str, **options: Any) -> dict[str, torch.Tensor]:
    return sample_inputs("bert" if kind == "bert-tokens" else kind, **options)


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, **extra).logits


def randomise_heads(model: torch.nn.Module) -> None:
    """Make trained-in-full heads differ from the base so that a wrong head would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
