"""MethodConformance: the checks every method plugin passes, on tiny real transformers models.

A plugin subclasses :class:`MethodConformance` in one of its test files and
says how to build its config; pytest then runs every check below once per
model kind::

    from peftkit.testing import MethodConformance

    class TestShift(MethodConformance):
        def make_config(self, kind, trained):
            return ShiftConfig(target_modules="all-linear", init_zero=not trained)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.adapter import Adapter
from peftkit.config import PeftConfig
from peftkit.errors import AdapterLoadError, MergeError
from peftkit.io import PEFT_PREFIX, WEIGHTS_NAME
from peftkit.methods import MethodSpec
from peftkit.model import BASE, PeftModel, get_peft_model
from peftkit.modules_to_save import saved_wrappers
from peftkit.plugins import get_registry
from peftkit.testing.models import (
    GENERATIVE_KINDS,
    MODEL_KINDS,
    sample_inputs,
    tiny_model,
)

Snapshot = tuple[dict[str, torch.Tensor], list[tuple[str, type]]]


class MethodConformance:
    """Base class of a plugin's conformance tests; subclass it as ``Test<Method>``.

    Override :meth:`make_config` (required), and where needed
    :attr:`model_kinds`, :meth:`can_merge` and the tolerances.
    """

    model_kinds: tuple[str, ...] = MODEL_KINDS  # which tiny models to run every check on
    atol: float = 1e-5
    rtol: float = 1e-5

    def make_config(self, kind: str, trained: bool) -> PeftConfig:
        """A new config for the tiny ``kind`` model.

        ``trained=False``: the method's initial adapter (a no-op where the spec
        says ``noop_at_init``). ``trained=True``: an adapter whose weights
        change the model's outputs, as after training (e.g. LoRA's
        ``init_lora_weights=False``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_config(kind, trained)")

    def can_merge(self, kind: str) -> bool:
        """Whether merging works on ``kind``; where not, the suite expects :class:`peftkit.MergeError`."""
        return self.spec.mergeable

    @property
    def spec(self) -> MethodSpec:
        """The registered spec of the method under test."""
        return get_registry().method_for_config(self.make_config(self.model_kinds[0], trained=False))

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each check once per model kind (``generate`` only on the generative ones)."""
        if "kind" in metafunc.fixturenames:
            metafunc.parametrize("kind", self.model_kinds)
        if "generative_kind" in metafunc.fixturenames:
            metafunc.parametrize("generative_kind", [k for k in self.model_kinds if k in GENERATIVE_KINDS])

    @pytest.fixture(autouse=True)
    def _one_thread(self) -> Iterator[None]:
        """Tiny models run fastest on one thread; several only contend (the count is restored after)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    # ------------------------------------------------------------------ checks
    def test_noop_at_init(self, kind: str) -> None:
        if not self.spec.noop_at_init:
            pytest.skip(f"method {self.spec.name!r} is not a no-op at init")
        base = tiny_model(kind)
        expected = _logits(base, sample_inputs(kind))
        model = self._peft(kind, trained=False, base=base)
        self._assert_same(_logits(model, sample_inputs(kind)), expected, "a fresh adapter changed the outputs")

    def test_save_load_round_trip(self, kind: str, tmp_path: Path) -> None:
        inputs = sample_inputs(kind)
        model = self._peft(kind, trained=True)
        expected = _logits(model, inputs)
        self._assert_differs(expected, _logits(tiny_model(kind), inputs))
        model.save_pretrained(tmp_path)
        on_disk = load_file(tmp_path / WEIGHTS_NAME)
        self._assert_same(on_disk, model.adapter_state_dict("default"), "the file differs from adapter_state_dict()")
        assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == self.spec.peft_type

        loaded = PeftModel.from_pretrained(tiny_model(kind), tmp_path)
        self._assert_same(_logits(loaded, inputs), expected, "from_pretrained gave other outputs")
        assert _config_fields(loaded.peft_config["default"]) == _config_fields(model.peft_config["default"])

        other = self._peft(kind, trained=True, seed=2)
        before = _logits(other, inputs)
        other.load_adapter(tmp_path, adapter_name="loaded")
        self._assert_same(_logits(other, inputs), before, "load_adapter changed the active adapter's outputs")
        other.set_adapter("loaded")
        self._assert_same(_logits(other, inputs), expected, "load_adapter + set_adapter gave other outputs")

    @pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
    def test_load_rejects_bad_tensors(self, kind: str, damage: str, tmp_path: Path) -> None:
        model = self._peft(kind, trained=True)
        model.save_pretrained(tmp_path / "good")
        keys = sorted(_plugin_tensors(model, "default"))
        tensors = load_file(tmp_path / "good" / WEIGHTS_NAME)
        if damage == "missing":
            del tensors[keys[-1]]
        elif damage == "unexpected":
            tensors[f"{PEFT_PREFIX}no_such_module.weight"] = torch.zeros(2)
        else:
            tensors[keys[0]] = torch.zeros([s + 1 for s in tensors[keys[0]].shape] or [2])
        bad = tmp_path / "bad"
        bad.mkdir()
        save_file(tensors, str(bad / WEIGHTS_NAME))
        (bad / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())

        target = self._peft(kind, trained=True, seed=2)
        before = _snapshot(target)
        with pytest.raises(AdapterLoadError):
            target.load_adapter(bad, adapter_name="bad")
        assert "bad" not in target.peft_config
        _assert_snapshots_equal(_snapshot(target), before, "a failed load_adapter changed the model")

        base = tiny_model(kind)
        original = _snapshot(base)
        with pytest.raises(AdapterLoadError):
            PeftModel.from_pretrained(base, bad)
        _assert_snapshots_equal(_snapshot(base), original, "a failed from_pretrained changed the base model")

    def test_merge(self, kind: str) -> None:
        inputs = sample_inputs(kind)
        model = self._peft(kind, trained=True)
        expected = _logits(model, inputs)
        before = _snapshot(model)
        if not self.can_merge(kind):
            with pytest.raises(MergeError):
                model.merge_adapter()
            _assert_snapshots_equal(_snapshot(model), before, "a refused merge changed the model")
            self._assert_same(_logits(model, inputs), expected, "a refused merge changed the outputs")
            with pytest.raises(MergeError):
                model.merge_and_unload()
            return
        model.merge_adapter()
        assert _adapter(model, "default").merged, "merge_adapter did not mark the adapter merged"
        merged_state = _snapshot(model)[0]
        assert any(not torch.equal(merged_state[k], v) for k, v in before[0].items()), "merge changed no weight"
        self._assert_same(_logits(model, inputs), expected, "merged outputs differ from unmerged ones")
        model.unmerge_adapter()
        self._assert_same(_snapshot(model)[0], before[0], "unmerge did not restore the weights")
        self._assert_same(_logits(model, inputs), expected, "unmerged outputs differ")

        merged = model.merge_and_unload()
        wrappers = [n for n, m in merged.named_modules() if getattr(m, "is_peftkit_wrapper", False)]
        assert not wrappers, f"merge_and_unload left peftkit modules: {wrappers}"
        assert sorted(merged.state_dict()) == sorted(tiny_model(kind).state_dict())
        self._assert_same(_logits(merged, inputs), expected, "merge_and_unload changed the outputs")

    def test_train_step(self, kind: str) -> None:
        base = tiny_model(kind)
        originals = {name: (param, param.detach().clone()) for name, param in base.named_parameters()}
        model = self._peft(kind, trained=True, base=base).train()
        named = dict(model.named_parameters())
        trainable = {name for name, param in named.items() if param.requires_grad}
        owned = {id(p) for p in _adapter(model, "default").parameters()}
        for wrapper in saved_wrappers(model.base_model).values():
            owned |= {id(p) for p in wrapper.modules_to_save["default"].parameters()}
        assert trainable, "the adapter has no trainable parameter"
        assert {id(named[n]) for n in trainable} == owned, (
            f"trainable parameters {sorted(trainable)} are not exactly the adapter's parameters() "
            f"and its modules_to_save"
        )
        before = {name: named[name].detach().clone() for name in trainable}
        optimizer = torch.optim.AdamW([named[n] for n in sorted(trainable)], lr=1e-2)
        model(**sample_inputs(kind, labels=True)).loss.backward()
        with_grad = {name for name, param in named.items() if param.grad is not None}
        assert with_grad == trainable, f"gradients reached {sorted(with_grad ^ trainable)}"
        optimizer.step()
        changed = [n for n, (p, copy) in originals.items() if not torch.equal(p.detach(), copy)]
        assert not changed, f"a training step changed base parameters {changed}"
        still = [n for n in trainable if torch.equal(named[n].detach(), before[n])]
        assert not still, f"a training step left adapter parameters unchanged: {still}"

    def test_disable_adapter(self, kind: str) -> None:
        inputs = sample_inputs(kind)
        base = tiny_model(kind)
        expected_base = _logits(base, inputs)
        model = self._peft(kind, trained=True, base=base)
        adapted = _logits(model, inputs)
        self._assert_differs(adapted, expected_base)
        with model.disable_adapter():
            self._assert_same(_logits(model, inputs), expected_base, "disable_adapter did not give base outputs")
        self._assert_same(_logits(model, inputs), adapted, "the adapter is not back after disable_adapter")
        if self.can_merge(kind):
            model.merge_adapter()
            with model.disable_adapter():
                self._assert_same(_logits(model, inputs), expected_base, "disable_adapter on a merged adapter")
            assert _adapter(model, "default").merged, "disable_adapter did not re-merge on exit"
            self._assert_same(_logits(model, inputs), adapted, "merged adapter changed by disable_adapter")

    def test_delete_adapter(self, kind: str) -> None:
        inputs = sample_inputs(kind)
        model = self._peft(kind, trained=True)
        adapted = _logits(model, inputs)
        before = _snapshot(model)
        trainable = _trainable(model)
        torch.manual_seed(2)
        model.add_adapter("second", self._config(kind, trained=True))
        model.set_adapter("second")
        _logits(model, inputs)
        model.set_adapter("default")
        model.delete_adapter("second")
        assert model.active_adapter == "default"
        _assert_snapshots_equal(_snapshot(model), before, "delete_adapter left traces")
        assert _trainable(model) == trainable, "delete_adapter changed which parameters are trainable"
        self._assert_same(_logits(model, inputs), adapted, "delete_adapter changed the remaining adapter")

    def test_delete_last_adapter_and_unload(self, kind: str) -> None:
        base = tiny_model(kind)
        original = _snapshot(base)
        model = self._peft(kind, trained=True, base=base)
        model.delete_adapter("default")
        _assert_snapshots_equal(_snapshot(model.base_model), original, "deleting the last adapter left traces")
        assert not _trainable(model.base_model), "deleting the last adapter left base parameters trainable"

        model = self._peft(kind, trained=True)
        torch.manual_seed(2)
        model.add_adapter("second", self._config(kind, trained=True))
        # As in Hugging Face PEFT, unload() keeps the active adapter's modules_to_save copies.
        state = dict(original[0])
        for name, wrapper in saved_wrappers(model.base_model).items():
            for key, value in wrapper.modules_to_save["default"].state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
        unloaded = model.unload()
        _assert_snapshots_equal(_snapshot(unloaded), (state, original[1]), "unload() did not give back the base model")

    def test_mixed_batch(self, kind: str) -> None:
        inputs = sample_inputs(kind)
        model = self._peft(kind, trained=True)
        torch.manual_seed(2)
        model.add_adapter("other", self._config(kind, trained=True))
        if not self.spec.mixed_batches:
            with pytest.raises(ValueError, match="mixed batches"):
                model(**inputs, adapter_names=["default", "other"])
            return
        model.set_adapter("other")
        other = _logits(model, inputs)
        with model.disable_adapter():
            base = _logits(model, inputs)
        model.set_adapter("default")
        with torch.no_grad():
            mixed = model(**inputs, adapter_names=["other", BASE]).logits
        self._assert_same(mixed[0], other[0], "row 0 of a mixed batch differs from adapter 'other' alone")
        self._assert_same(mixed[1], base[1], "row 1 of a mixed batch ('__base__') differs from the base model")

    def test_generate(self, generative_kind: str) -> None:
        kind = generative_kind
        prompt: dict[str, Any] = {k: v for k, v in sample_inputs(kind).items() if k in ("input_ids", "attention_mask")}
        options: dict[str, Any] = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
        base: Any = tiny_model(kind)
        expected = base.generate(**prompt, **options)
        model = self._peft(kind, trained=False, base=base)
        tokens = model.generate(**prompt, **options)
        assert tokens.shape == expected.shape
        if self.spec.noop_at_init:
            assert torch.equal(tokens, expected), "a fresh adapter changed greedy generation"
        model = self._peft(kind, trained=True, base=tiny_model(kind))
        assert model.generate(**prompt, **options).shape == expected.shape
        with model.disable_adapter():
            assert torch.equal(model.generate(**prompt, **options), expected), "generate under disable_adapter"

    # ----------------------------------------------------------------- helpers
    def _config(self, kind: str, trained: bool) -> PeftConfig:
        config = self.make_config(kind, trained)
        assert isinstance(config, PeftConfig), "make_config must return a peftkit.PeftConfig"
        return config

    def _peft(self, kind: str, trained: bool, seed: int = 1, base: nn.Module | None = None) -> PeftModel:
        """Wrap a tiny model; a trained adapter also gets its modules_to_save copies moved off the base."""
        base = tiny_model(kind) if base is None else base
        torch.manual_seed(seed)
        model = get_peft_model(base, self._config(kind, trained))
        if trained:
            with torch.no_grad():
                for wrapper in saved_wrappers(model.base_model).values():
                    for param in wrapper.modules_to_save["default"].parameters():
                        param.add_(torch.randn_like(param) * 0.1)
        return model.eval()

    def _assert_same(self, actual: Any, expected: Any, message: str) -> None:
        torch.testing.assert_close(actual, expected, atol=self.atol, rtol=self.rtol, msg=lambda m: f"{message}: {m}")

    def _assert_differs(self, adapted: torch.Tensor, base: torch.Tensor) -> None:
        assert not torch.allclose(adapted, base, atol=self.atol, rtol=self.rtol), (
            "make_config(kind, trained=True) must give an adapter that changes the outputs"
        )


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _adapter(model: PeftModel, name: str) -> Adapter:
    return model._adapters[name]


def _plugin_tensors(model: PeftModel, name: str) -> Iterator[str]:
    """Disk keys of the tensors the method plugin (not the core's modules_to_save) writes."""
    adapter = _adapter(model, name)
    yield from get_registry().hook.peftkit_state_dict(adapter=adapter, config=adapter.config, tensors=None)


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _config_fields(config: PeftConfig) -> dict[str, Any]:
    data = config.to_dict()
    for key in ("inference_mode", "base_model_name_or_path"):
        data.pop(key)
    return data


def _snapshot(model: nn.Module) -> Snapshot:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(name, type(module)) for name, module in model.named_modules()]


def _assert_snapshots_equal(actual: Snapshot, expected: Snapshot, message: str) -> None:
    (state, modules), (want_state, want_modules) = actual, expected
    extra, lost = sorted(set(state) - set(want_state)), sorted(set(want_state) - set(state))
    assert not extra and not lost, f"{message}: state_dict keys added {extra[:5]}, removed {lost[:5]}"
    differing = [k for k, v in want_state.items() if not torch.equal(state[k], v)]
    assert not differing, f"{message}: values changed in {differing[:5]}"
    assert modules == want_modules, f"{message}: module types differ"
