"""Package attributes imported on first use, so that importing a package stays cheap (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``exports`` maps each attribute to the module defining it.

    ``__getattr__ = lazy_exports(__name__, {"PeftModel": "peftkit.model"})``
    imports ``peftkit.model`` when ``peftkit.PeftModel`` is first read.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
