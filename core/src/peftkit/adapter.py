"""The handle a method plugin returns from ``peftkit_inject``."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from peftkit.config import PeftConfig


class Adapter:
    """One adapter added to one model: what it touched and how to switch it.

    A method plugin subclasses this and fills in :meth:`parameters` and
    :meth:`set_active`; the core keeps one per adapter name and passes it back
    to the plugin's ``forward``, ``state_dict`` and ``merge`` hooks.
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.targets)} modules)"
