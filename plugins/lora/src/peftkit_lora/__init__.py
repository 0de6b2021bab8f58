"""peftkit-lora: low-rank adaptation (LoRA) as a peftkit method plugin.

Importing this package does not import torch; the layers load when an
adapter is first added.
"""

from peftkit_lora.config import LoraConfig

__version__ = "0.1.0"
__all__ = ["LoraConfig"]
