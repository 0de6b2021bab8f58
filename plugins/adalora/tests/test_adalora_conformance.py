"""AdaLoRA (peftkit-adalora) against the method conformance kit."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_adalora import AdaLoraConfig


class TestAdaLora(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> AdaLoraConfig:
        # init_lora_weights=True starts with every singular value at zero (a no-op), as in PEFT.
        return AdaLoraConfig(
            init_r=4,
            target_r=2,
            total_step=10,
            target_modules="all-linear",
            init_lora_weights=not trained,
            task_type="SEQ_CLS" if kind == "bert" else None,
        )
