"""LoRA (peftkit-lora) against the method conformance kit."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_lora import LoraConfig


class TestLora(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> LoraConfig:
        return LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=not trained,
            task_type="SEQ_CLS" if kind == "bert" else None,
        )
