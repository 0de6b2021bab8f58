"""LoRA over 4-bit base layers against the method conformance kit.

The kit builds its base models with ``tiny_model(kind)``; here that factory
gives the same tiny models with their linear layers already quantized (NF4,
double quantization, fp32 compute), so every check runs on a quantized base
and compares quantized outputs with quantized outputs. The kit's merge check
expects merging to keep the state-dict keys; merging into a 4-bit layer
replaces it with a dense one until unmerge, so :meth:`test_merge` is this
plugin's own version of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import bitsandbytes as bnb
import pytest
import torch
from conftest import FP32, quantized

from peftkit.testing import MethodConformance, sample_inputs, suite
from peftkit_qlora import QLoraConfig, QLoraMergeWarning


class TestQLora(MethodConformance):
    atol = 1e-5
    rtol = 1e-5

    @pytest.fixture(autouse=True)
    def quantized_bases(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setattr(suite, "tiny_model", lambda kind, seed=0: quantized(kind, seed))
        yield

    def make_config(self, kind: str, trained: bool) -> QLoraConfig:
        return QLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=not trained,
            task_type="SEQ_CLS" if kind == "bert" else None,
            quantize=False,  # the base is quantized already
            **FP32,
        )

    @pytest.mark.filterwarnings("ignore::peftkit_qlora.QLoraMergeWarning")
    def test_merge(self, kind: str) -> None:
        inputs = sample_inputs(kind)
        model = self._peft(kind, trained=True)
        expected = suite._logits(model, inputs)
        before = suite._snapshot(model)
        with pytest.warns(QLoraMergeWarning, match="dequantizing"):
            model.merge_adapter()
        assert model._adapters["default"].merged
        assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.endswith("base_layer"))
        self._assert_same(suite._logits(model, inputs), expected, "merged outputs differ from unmerged ones")
        model.unmerge_adapter()
        after = suite._snapshot(model)
        self._assert_same(after[0], before[0], "unmerge did not restore the weights")
        packed = [k for k, v in before[0].items() if v.dtype == torch.uint8 or ".weight." in k]
        assert packed and all(torch.equal(after[0][k], before[0][k]) for k in packed), (
            "4-bit weights not restored bit for bit"
        )
        self._assert_same(suite._logits(model, inputs), expected, "unmerged outputs differ")

        merged = model.merge_and_unload()
        wrappers = [n for n, m in merged.named_modules() if getattr(m, "is_peftkit_wrapper", False)]
        assert not wrappers, f"merge_and_unload left peftkit modules: {wrappers}"
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules()), "merged layers come back dense"
        dense_keys = {k for k in suite.tiny_model(kind).state_dict() if ".weight." not in k}
        assert set(merged.state_dict()) == dense_keys, "the merged model has the dense model's keys"
        assert all(p.dtype == torch.float32 for p in merged.parameters()), "dense in the compute dtype"
        self._assert_same(suite._logits(merged, inputs), expected, "merge_and_unload changed the outputs")
