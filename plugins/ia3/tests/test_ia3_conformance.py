"""(IA)^3 (peftkit-ia3) against the method conformance kit."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_ia3 import IA3Config


class TestIA3(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> IA3Config:
        # PEFT's default targets per architecture (keys, values, feed-forward output) plus a SEQ_CLS head for BERT.
        return IA3Config(init_ia3_weights=not trained, task_type="SEQ_CLS" if kind == "bert" else None)
