"""The shift method against peftkit's conformance kit. Keep this file when you copy the template."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_template import ShiftConfig


class TestShift(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> ShiftConfig:
        # BERT is a classifier: task_type SEQ_CLS makes its head a modules_to_save copy.
        task_type = "SEQ_CLS" if kind == "bert" else None
        return ShiftConfig(target_modules="all-linear", init_zero=not trained, task_type=task_type)

    def can_merge(self, kind: str) -> bool:
        # Shift merges into biases; the tiny Llama and T5 have none, so there merge must raise MergeError.
        return kind in ("gpt2", "bert")
