"""peftkit-adalora: AdaLoRA (adaptive budget allocation for low-rank adaptation) as a peftkit method plugin.

Importing this package does not import torch; the training helpers
(:func:`update_and_allocate`, :func:`orthogonal_regularization`,
:func:`rank_allocator`, :class:`AdaLoraCallback`) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    from peftkit_adalora.allocator import AllocationError, RankAllocator
    from peftkit_adalora.training import AdaLoraCallback, orthogonal_regularization, rank_allocator, update_and_allocate

__version__ = "0.1.0"

_LAZY = {
    "AdaLoraCallback": "peftkit_adalora.training",
    "AllocationError": "peftkit_adalora.allocator",
    "RankAllocator": "peftkit_adalora.allocator",
    "orthogonal_regularization": "peftkit_adalora.training",
    "rank_allocator": "peftkit_adalora.training",
    "update_and_allocate": "peftkit_adalora.training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit_adalora' has no attribute {name!r}")


__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AllocationError",
    "RankAllocator",
    "orthogonal_regularization",
    "rank_allocator",
    "update_and_allocate",
]
