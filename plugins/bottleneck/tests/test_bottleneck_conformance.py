"""Bottleneck adapters (peftkit-bottleneck) against the method conformance kit, once per adapter type."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_bottleneck import BottleneckConfig


class TestHoulsby(MethodConformance):
    adapter_type = "houlsby"

    def make_config(self, kind: str, trained: bool) -> BottleneckConfig:
        return BottleneckConfig(
            adapter_type=self.adapter_type,
            reduction_factor=4,
            init_weights=not trained,
            task_type="SEQ_CLS" if kind == "bert" else None,
        )


class TestPfeiffer(TestHoulsby):
    """Houlsby's code with half the placements; two models keep the suite fast."""

    adapter_type = "pfeiffer"
    model_kinds = ("gpt2", "t5")


class TestParallel(TestHoulsby):
    adapter_type = "parallel"
