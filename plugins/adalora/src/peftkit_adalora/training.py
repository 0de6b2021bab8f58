"""What a training loop calls: the per-step rank allocation, the regulariser, and a Trainer callback."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peftkit_adalora.adapter import find_adapter
from peftkit_adalora.allocator import AllocationError, RankAllocator


def rank_allocator(model: nn.Module, adapter_name: str | None = None) -> RankAllocator:
    """The :class:`RankAllocator` of an AdaLoRA adapter (default: the PeftModel's active adapter).

    Its ``ranks()`` gives each module's current rank and ``budget_schedule(step)``
    the total budget at a step.
    """
    return find_adapter(model, adapter_name).allocator


def update_and_allocate(model: nn.Module, global_step: int, adapter_name: str | None = None) -> int:
    """Update the importance scores and re-allocate the ranks: call once per optimizer step.

    ``global_step`` is the number of optimizer steps taken so far (1 after the
    first). Call it after ``loss.backward()``; before or after
    ``optimizer.step()`` and ``optimizer.zero_grad()`` alike, since the
    sensitivities are recorded when the backward pass ends. Returns the total
    rank budget at this step. Raises :class:`AllocationError` when the adapter
    is frozen or no backward pass ran since the last call.
    """
    adapter = find_adapter(model, adapter_name)
    if not adapter.trainable:
        raise AllocationError(
            f"AdaLoRA adapter {adapter.name!r} is not trainable (loaded without is_trainable=True, in inference_mode, "
            f"or not the active adapter); only a training adapter's ranks are allocated"
        )
    return adapter.allocator.update_and_allocate(global_step)


def orthogonal_regularization(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """``orth_reg_weight * mean(||P^T P - I||_F, ||Q Q^T - I||_F)`` over the adapter's modules, with gradients.

    Add it to your loss when you compute the loss yourself. When the model
    returns a loss (``labels`` given) in training mode, it is already added.
    """
    return find_adapter(model, adapter_name).orthogonal_regularization()


class AdaLoraCallback(TrainerCallback):
    """Runs :func:`update_and_allocate` after every optimizer step of a ``transformers.Trainer``.

    ``Trainer(model=peft_model, ..., callbacks=[AdaLoraCallback()])``; set the
    config's ``total_step`` to the run's number of optimizer steps (``max_steps``).
    """

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        total_step = find_adapter(_required(model), self.adapter_name).config.total_step
        if state.max_steps and state.max_steps != total_step:
            warnings.warn(
                f"AdaLoRA's total_step is {total_step} but this Trainer runs {state.max_steps} optimizer steps; "
                f"the rank budget follows total_step",
                stacklevel=2,
            )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        update_and_allocate(_required(model), state.global_step, self.adapter_name)


def _required(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise AllocationError("AdaLoraCallback got no model from the Trainer")
    return model
