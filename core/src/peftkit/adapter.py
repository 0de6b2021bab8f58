"""The handle a method plugin returns from ``peftkit_inject``, and a base for methods that wrap layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import Tensor, nn

from peftkit.config import PeftConfig
from peftkit.targeting import get_submodule_parent


class Adapter:
    """One adapter added to one model: what it touched and how to switch it.

    A method plugin subclasses this and fills in :meth:`parameters` and
    :meth:`set_active`; the core keeps one per adapter name and passes it back
    to the plugin's ``forward``, ``state_dict`` and ``merge`` hooks. The hooks
    of :func:`peftkit.hookimpls.method_hooks` call the other methods here, so a
    plugin that uses them implements those too.
    """

    def __init__(self, name: str, config: PeftConfig, targets: list[str]) -> None:
        self.name = name
        self.config = config
        self.targets = targets  # names of the modules the adapter touched
        self.merged = False

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this adapter trains."""
        raise NotImplementedError

    def set_active(self, active: bool) -> None:
        """Switch the adapter's effect on or off in the model's forward."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], rows: dict[str, Tensor] | None) -> AbstractContextManager[dict[str, Any]]:
        """A context for one call of the model that yields the inputs to use (``peftkit_forward``)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors under their keys in the file (``peftkit_state_dict`` when saving)."""
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors in; raise ``AdapterLoadError``, changing nothing, if they do not fit."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the adapter into the base weights, or raise ``MergeError`` saying why it cannot."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weights."""
        raise NotImplementedError

    def unload(self) -> None:
        """Remove everything the adapter added to the model."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.targets)} modules)"


class LayerAdapter(Adapter):
    """An adapter that lives in wrapper layers: ``layers`` maps each target's name to its wrapper.

    A wrapper keeps the original module as ``base_layer``, holds several
    adapters by name (``adapter_names``, ``remove_adapter(name)``,
    ``merge(name)``, ``unmerge(name)``) and reads two attributes in its
    forward: ``active``, the adapter in effect (or ``None``), and ``rows``, set
    for one mixed-batch call (else ``None``). This class switches, routes,
    merges and unloads through them; a subclass adds :meth:`parameters`,
    :meth:`state_dict` and :meth:`load_state_dict`.
    """

    def __init__(self, name: str, config: PeftConfig, model: nn.Module, layers: dict[str, Any]) -> None:
        super().__init__(name, config, list(layers))
        self.model = model
        self.layers = layers

    def set_active(self, active: bool) -> None:
        for layer in self.layers.values():
            if active:
                layer.active = self.name
            elif layer.active == self.name:
                layer.active = None

    @contextmanager
    def forward(self, inputs: dict[str, Any], rows: dict[str, Tensor] | None) -> Iterator[dict[str, Any]]:
        """Give every layer of this adapter the batch rows of each adapter for one call; the inputs pass as they are."""
        routed = None if rows is None else self.layer_rows(rows)
        # ``rows`` is a plain attribute: written straight into each layer's __dict__, as nn.Module's
        # __setattr__ would, without its checks (microseconds per layer, twice per call, on the hot path)
        for layer in self.layers.values():
            vars(layer)["rows"] = routed
        try:
            yield inputs
        finally:
            for layer in self.layers.values():
                vars(layer)["rows"] = None

    def layer_rows(self, rows: dict[str, Tensor]) -> Any:
        """What the layers get as ``rows`` for a mixed batch: the adapter name -> row indices dict itself."""
        return rows

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge(self.name)
        self.merged = True

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge(self.name)
        self.merged = False

    def unload(self) -> None:
        """Remove this adapter; layers left with no adapter go back to their base module."""
        for target, layer in self.layers.items():
            layer.remove_adapter(self.name)
            if not layer.adapter_names:
                parent, attr = get_submodule_parent(self.model, target)
                setattr(parent, attr, layer.base_layer)
        self.layers = {}
