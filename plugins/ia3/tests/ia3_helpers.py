"""Helpers shared by the (IA)^3 tests (a uniquely named module, so plugin test folders never clash)."""

from __future__ import annotations

import torch

from peftkit.testing.models import tiny_model

KINDS = ("llama", "gpt2", "bert", "t5")
TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **extra: object) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, **extra).logits


def fresh(kind: str) -> torch.nn.Module:
    """The same randomly initialised base model every call."""
    return tiny_model(kind)


def randomise_heads(model: torch.nn.Module) -> None:
    """Make trained-in-full heads differ from the base, so a wrong head would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
