"""The conformance kit every peftkit method plugin runs against itself.

``from peftkit.testing import MethodConformance`` and subclass it in a test
file (see docs/plugin-authors.md). Importing this package is cheap: the suite
and the tiny models load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.testing.models import sample_inputs, tiny_model
    from peftkit.testing.suite import MethodConformance

_LAZY = {
    "MethodConformance": "peftkit.testing.suite",
    "sample_inputs": "peftkit.testing.models",
    "tiny_model": "peftkit.testing.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit.testing' has no attribute {name!r}")


__all__ = ["MethodConformance", "sample_inputs", "tiny_model"]
