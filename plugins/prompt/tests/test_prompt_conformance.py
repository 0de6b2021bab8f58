"""Prompt tuning against peftkit's conformance kit and the shared virtual-token behaviour suite."""

from __future__ import annotations

from typing import Any

import peft

from peftkit.testing import MethodConformance
from peftkit_prompt import PromptTuningConfig
from peftkit_prompt.testing.models import TASK_TYPES
from peftkit_prompt.testing.suite import VirtualTokenSuite


class TestPromptTuningConformance(MethodConformance):
    # A random prompt changes the outputs from the start: there is no "untrained" no-op adapter.
    def make_config(self, kind: str, trained: bool) -> PromptTuningConfig:
        return PromptTuningConfig(num_virtual_tokens=3, task_type=TASK_TYPES[kind])


class TestPromptTuningBehaviour(VirtualTokenSuite):
    def make_config(self, kind: str) -> PromptTuningConfig:
        return PromptTuningConfig(num_virtual_tokens=self.n, task_type=TASK_TYPES[kind])

    def make_peft_config(self, kind: str) -> Any:
        return peft.PromptTuningConfig(num_virtual_tokens=self.n, task_type=TASK_TYPES[kind])
