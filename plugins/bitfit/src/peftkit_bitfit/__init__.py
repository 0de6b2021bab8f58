"""peftkit-bitfit: BitFit, bias-only fine-tuning, as a peftkit method plugin.

Importing this package does not import torch; the adapter code loads when an
adapter is first added.
"""

from peftkit_bitfit.config import BitFitConfig

__version__ = "0.1.0"
__all__ = ["BitFitConfig"]
