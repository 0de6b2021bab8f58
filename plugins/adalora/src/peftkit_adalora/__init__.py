"""peftkit-adalora: AdaLoRA (adaptive budget allocation for low-rank adaptation) as a peftkit method plugin.

Importing this package does not import torch; the training helpers
(:func:`update_and_allocate`, :func:`orthogonal_regularization`,
:func:`rank_allocator`, :class:`AdaLoraCallback`) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.lazy import lazy_exports
from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    from peftkit_adalora.allocator import AllocationError, RankAllocator
    from peftkit_adalora.training import AdaLoraCallback, orthogonal_regularization, rank_allocator, update_and_allocate

__version__ = "0.1.0"

__getattr__ = lazy_exports(
    __name__,
    {
        "AdaLoraCallback": "peftkit_adalora.training",
        "AllocationError": "peftkit_adalora.allocator",
        "RankAllocator": "peftkit_adalora.allocator",
        "orthogonal_regularization": "peftkit_adalora.training",
        "rank_allocator": "peftkit_adalora.training",
        "update_and_allocate": "peftkit_adalora.training",
    },
)


__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AllocationError",
    "RankAllocator",
    "orthogonal_regularization",
    "rank_allocator",
    "update_and_allocate",
]
