"""peftkit's pytest plugin (entry point ``pytest11``): fixtures for testing method plugins.

Loaded by every pytest run in an environment where peftkit is installed, so it
imports nothing heavy: torch and transformers load inside the fixtures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn


@pytest.fixture
def peftkit_tiny_model() -> Callable[..., nn.Module]:
    """Factory ``(kind, seed=0) -> model``: a tiny seeded ``"llama"``, ``"gpt2"``, ``"bert"`` or ``"t5"`` model."""
    from peftkit.testing.models import tiny_model

    return tiny_model


@pytest.fixture
def peftkit_sample_inputs() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory ``(kind, labels=False, seed=0) -> inputs``: forward keyword arguments for a tiny model."""
    from peftkit.testing.models import sample_inputs

    return sample_inputs
