"""Shared pieces of the AdaLoRA tests: tiny models, configs, and a training loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_adalora import update_and_allocate

TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
# A short schedule: steps 1-4 reallocate, the allocation is fixed at step 4, step 5 fine-tunes.
SCHEDULE = {"init_r": 3, "target_r": 1, "total_step": 5, "tinit": 0, "tfinal": 1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the machine is shared (import this into a test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def config_fields(kind: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments valid for both peftkit_adalora.AdaLoraConfig and peft.AdaLoraConfig."""
    return {**SCHEDULE, "target_modules": "all-linear", "task_type": TASK_TYPES[kind], "lora_alpha": 4, **overrides}


def randomise_heads(model: torch.nn.Module) -> None:
    """Make trained-in-full heads differ from the base, so that a wrong head would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))


def train(
    model: torch.nn.Module,
    kind: str,
    steps: int,
    allocate: Any = None,
    order: str = "after_zero_grad",
    lr: float = 1e-2,
) -> None:
    """A plain loop of ``steps`` optimizer steps with ``allocate(model, step)`` once per step.

    ``order`` places the allocation after ``zero_grad`` (our default, which PEFT cannot do),
    ``"before_zero_grad"`` (PEFT's documented place) or ``"before_step"``.
    """
    allocate = allocate or update_and_allocate
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        model(**sample_inputs(kind, labels=True, seed=step)).loss.backward()
        if order == "before_step":
            allocate(model, step)
        optimizer.step()
        if order == "before_zero_grad":
            allocate(model, step)
        optimizer.zero_grad()
        if order == "after_zero_grad":
            allocate(model, step)


def peft_allocate(model: Any, step: int) -> None:
    model.base_model.update_and_allocate(step)


def fresh(kind: str) -> torch.nn.Module:
    return tiny_model(kind)


def peftkit_model(kind: str, **overrides: Any) -> peftkit.PeftModel:
    from peftkit_adalora import AdaLoraConfig

    return peftkit.get_peft_model(fresh(kind), AdaLoraConfig(**config_fields(kind, **overrides)))
