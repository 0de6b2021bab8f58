"""peftkit-lora: low-rank adaptation (LoRA) as a peftkit method plugin.

Importing this package does not import torch; the layers load when an
adapter is first added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.lazy import lazy_exports
from peftkit_lora.config import LoraConfig

if TYPE_CHECKING:
    from peftkit_lora.graphed import GraphedTrainingStep

__version__ = "0.1.0"

__getattr__ = lazy_exports(__name__, {"GraphedTrainingStep": "peftkit_lora.graphed"})

__all__ = ["GraphedTrainingStep", "LoraConfig"]
