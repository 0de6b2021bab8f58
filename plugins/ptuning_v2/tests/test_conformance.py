"""The peftkit conformance suite for P-tuning v2 (T5 with prompts in both encoder and decoder)."""

from __future__ import annotations

from conftest import TASK_TYPES

from peftkit.testing import MethodConformance
from peftkit_ptuning_v2 import PTuningV2Config


class TestPTuningV2(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> PTuningV2Config:
        return PTuningV2Config(num_virtual_tokens=3, task_type=TASK_TYPES[kind], prefix_dropout=0.1)
