"""Tiny real models for the LoRA tests (random weights, built from configs)."""

from __future__ import annotations

import pytest
import torch

from peftkit.testing.models import MODEL_KINDS, sample_inputs, tiny_model


@pytest.fixture(params=MODEL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def fresh(kind: str) -> torch.nn.Module:
    """The same randomly initialised base model every call."""
    return tiny_model(kind)


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **extra: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def three_rows(kind: str) -> dict[str, torch.Tensor]:
    """Sample inputs with a third row, so a mixed batch can hold three choices."""
    return {k: torch.cat([v, v[:1].flip(-1)]) for k, v in sample_inputs(kind).items()}
