"""The conformance kit every peftkit method plugin runs against itself.

``from peftkit.testing import MethodConformance`` and subclass it in a test
file (see docs/plugin-authors.md). Importing this package is cheap: the suite
and the tiny models load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.lazy import lazy_exports

if TYPE_CHECKING:
    from peftkit.testing.models import sample_inputs, tiny_model
    from peftkit.testing.suite import MethodConformance

__getattr__ = lazy_exports(
    __name__,
    {
        "MethodConformance": "peftkit.testing.suite",
        "sample_inputs": "peftkit.testing.models",
        "tiny_model": "peftkit.testing.models",
    },
)


__all__ = ["MethodConformance", "sample_inputs", "tiny_model"]
