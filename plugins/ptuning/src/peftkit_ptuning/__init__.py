"""peftkit-ptuning: P-tuning for peftkit (virtual tokens produced by a trained prompt encoder).

Importing this package does not import torch (only the config is defined here).
"""

from peftkit_ptuning.config import PromptEncoderConfig

__version__ = "0.1.0"
__all__ = ["PromptEncoderConfig"]
