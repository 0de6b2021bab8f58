"""P-tuning against peftkit's conformance kit and the shared virtual-token behaviour suite."""

from __future__ import annotations

from typing import Any

import peft

from peftkit.testing import MethodConformance
from peftkit_prompt.testing.models import TASK_TYPES
from peftkit_prompt.testing.suite import VirtualTokenSuite
from peftkit_ptuning import PromptEncoderConfig


class TestPTuningConformance(MethodConformance):
    # A random encoder changes the outputs from the start: there is no "untrained" no-op adapter.
    def make_config(self, kind: str, trained: bool) -> PromptEncoderConfig:
        return PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type=TASK_TYPES[kind])


class TestPTuningBehaviour(VirtualTokenSuite):
    def make_config(self, kind: str) -> PromptEncoderConfig:
        return PromptEncoderConfig(num_virtual_tokens=self.n, encoder_hidden_size=8, task_type=TASK_TYPES[kind])

    def make_peft_config(self, kind: str) -> Any:
        return peft.PromptEncoderConfig(num_virtual_tokens=self.n, encoder_hidden_size=8, task_type=TASK_TYPES[kind])
