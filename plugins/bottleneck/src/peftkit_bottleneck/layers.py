"""The bottleneck wrapper: the original module as ``base_layer`` plus any number of named adapters.

A *sequential* adapter (houlsby, pfeiffer) transforms the wrapped module's
output ``h`` into ``h + scaling * up(act(down(h)))``. A *parallel* adapter
reads the wrapped module's input ``x`` and returns
``module(x) + scaling * up(act(down(x)))``. Modules returning a tuple (a
whole attention block) have the adapter applied to the first element.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class Bottleneck(nn.Module):
    """down-projection, non-linearity, up-projection."""

    def __init__(self, in_features: int, size: int, out_features: int, non_linearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype))))


class BottleneckLayer(nn.Module):
    """A module with bottleneck adapters around it; the one named ``active`` runs."""

    is_peftkit_wrapper = True

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.bottleneck = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.rows: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # e.g. T5 reads ``wo.weight.dtype``

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bottleneck)

    def add_adapter(
        self, name: str, size: int, non_linearity: str, parallel: bool, scaling: float, init_zero: bool
    ) -> None:
        adapter = Bottleneck(
            self.in_features if parallel else self.out_features, size, self.out_features, non_linearity
        )
        if init_zero:
            nn.init.zeros_(adapter.up.weight)
            nn.init.zeros_(adapter.up.bias)
        reference = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        if reference is not None and reference.device.type != "meta":
            adapter.to(device=reference.device, dtype=reference.dtype)
        self.bottleneck[name] = adapter
        self.parallel[name], self.scaling[name] = parallel, scaling

    def remove_adapter(self, name: str) -> None:
        del self.bottleneck[name], self.parallel[name], self.scaling[name]
        if self.active == name:
            self.active = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.rows is None and self.active is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        if self.rows is not None:
            for name, rows in self.rows.items():
                if name in self.bottleneck:
                    source = _module_input(args, kwargs) if self.parallel[name] else hidden
                    hidden = hidden.index_add(0, rows, self._delta(name, source[rows]).to(hidden.dtype))
        else:
            name = self.active
            source = _module_input(args, kwargs) if self.parallel[name] else hidden
            hidden = hidden + self._delta(name, source).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _delta(self, name: str, source: torch.Tensor) -> torch.Tensor:
        return self.bottleneck[name](source) * self.scaling[name]


def _module_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor the wrapped module was called with: its first argument, or ``hidden_states=``."""
    source = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(source, torch.Tensor):
        raise TypeError("a parallel bottleneck adapter needs the wrapped module's input tensor as its first argument")
    return source
