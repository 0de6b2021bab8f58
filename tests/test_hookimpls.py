"""peftkit.method_hooks answers the per-adapter hooks for its own configs only; check_tensors words load errors."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, ClassVar

import pluggy
import pytest
import torch

import peftkit
from peftkit import hookspecs
from peftkit.io import check_tensors


@dataclass
class OwnConfig(peftkit.PeftConfig):
    peft_type: ClassVar[str] = "OWN"


@dataclass
class OtherConfig(peftkit.PeftConfig):
    peft_type: ClassVar[str] = "OTHER"


class RecordingAdapter:
    """Stands in for a peftkit.Adapter: records which of its methods the hooks call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def forward(self, inputs: dict[str, Any], rows: Any) -> str:
        self.calls.append(("forward", rows))
        return "context"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(2)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.calls.append(("load_state_dict", sorted(tensors)))

    def merge(self) -> None:
        self.calls.append(("merge", None))

    def unmerge(self) -> None:
        self.calls.append(("unmerge", None))

    def unload(self) -> None:
        self.calls.append(("unload", None))


def inject(model: Any, config: peftkit.PeftConfig, adapter_name: str) -> tuple[Any, str]:
    """The inject function the hooks under test name, by this module's import path."""
    return model, adapter_name


@pytest.fixture
def hook() -> Any:
    """A pluggy hook relay with only method_hooks(OwnConfig, ...) registered, as a plugin module assigns them."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    hooks = peftkit.method_hooks(OwnConfig, f"{__name__}:inject")
    plugin = types.SimpleNamespace(
        peftkit_inject=hooks.inject,
        peftkit_forward=hooks.forward,
        peftkit_state_dict=hooks.state_dict,
        peftkit_merge=hooks.merge,
    )
    manager.register(plugin, name="own")
    return manager.hook


def test_hooks_answer_for_their_configs(hook: Any) -> None:
    assert hook.peftkit_inject(model="model", config=OwnConfig(), adapter_name="a") == ("model", "a")
    adapter = RecordingAdapter()
    rows = {"a": torch.tensor([0])}
    assert hook.peftkit_forward(adapter=adapter, config=OwnConfig(), inputs={}, rows=rows) == "context"
    assert torch.equal(hook.peftkit_state_dict(adapter=adapter, config=OwnConfig(), tensors=None)["w"], torch.zeros(2))
    assert hook.peftkit_state_dict(adapter=adapter, config=OwnConfig(), tensors={"w": torch.ones(2)}) == {}
    for action in ("merge", "unmerge", "unload"):
        assert hook.peftkit_merge(adapter=adapter, config=OwnConfig(), action=action) is True
    assert adapter.calls == [
        ("forward", rows),
        ("load_state_dict", ["w"]),
        ("merge", None),
        ("unmerge", None),
        ("unload", None),
    ]


def test_hooks_return_none_for_other_configs(hook: Any) -> None:
    adapter = RecordingAdapter()
    assert hook.peftkit_inject(model="model", config=OtherConfig(), adapter_name="a") is None
    assert hook.peftkit_forward(adapter=adapter, config=OtherConfig(), inputs={}, rows=None) is None
    assert hook.peftkit_state_dict(adapter=adapter, config=OtherConfig(), tensors=None) is None
    assert hook.peftkit_merge(adapter=adapter, config=OtherConfig(), action="unload") is None
    assert adapter.calls == []


def test_inject_path_needs_module_and_function() -> None:
    with pytest.raises(ValueError, match="'module:function'"):
        peftkit.method_hooks(OwnConfig, "peftkit_template.shift.inject")


def test_check_tensors_names_every_problem() -> None:
    expected = {f"k{i}": torch.zeros(2) for i in range(8)}
    tensors = {"k0": torch.zeros(3), "extra": torch.zeros(1)}
    with pytest.raises(peftkit.AdapterLoadError) as caught:
        check_tensors(tensors, expected, "test adapter", "is it for another model?")
    assert str(caught.value) == (
        "test adapter does not fit this model (missing keys k1, k2, k3, k4, k5 and 2 more; unexpected keys extra; "
        "shape mismatches k0: file (3,), model (2,)); is it for another model?"
    )
    check_tensors(dict(expected), expected, "test adapter", "unused")
