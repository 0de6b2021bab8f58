"""peftkit-ia3: (IA)^3, learned scaling vectors, as a peftkit method plugin.

Importing this package does not import torch; the layers load when an
adapter is first added.
"""

from peftkit_ia3.config import IA3Config

__version__ = "0.1.0"
__all__ = ["IA3Config"]
