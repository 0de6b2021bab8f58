"""The peftkit conformance suite, for prefix tuning with and without the reparameterisation MLP."""

from __future__ import annotations

from conftest import TASK_TYPES

from peftkit.testing import MethodConformance
from peftkit_prefix import PrefixTuningConfig


class TestPrefixTuning(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> PrefixTuningConfig:
        return PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK_TYPES[kind])


class TestPrefixTuningProjected(MethodConformance):
    model_kinds = ("llama", "t5")

    def make_config(self, kind: str, trained: bool) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=3, task_type=TASK_TYPES[kind], prefix_projection=True, encoder_hidden_size=12
        )
