"""BitFit (peftkit-bitfit) against the method conformance kit."""

from __future__ import annotations

from peftkit.testing import MethodConformance
from peftkit_bitfit import BitFitConfig

NO_BIASES = ("llama", "t5")  # these models have no bias at all, so BitFit adds zero ones


class TestBitFit(MethodConformance):
    def make_config(self, kind: str, trained: bool) -> BitFitConfig:
        return BitFitConfig(
            add_missing_biases=kind in NO_BIASES,
            init_weights=not trained,
            task_type="SEQ_CLS" if kind == "bert" else None,
        )

    def can_merge(self, kind: str) -> bool:
        # Merging added biases would change the base architecture, so BitFit refuses with a MergeError.
        return kind not in NO_BIASES
