"""peftkit-bottleneck: bottleneck adapters (Houlsby, Pfeiffer, parallel) as a peftkit method plugin.

Importing this package does not import torch; the layers load when an
adapter is first added.
"""

from peftkit_bottleneck.config import BottleneckConfig

__version__ = "0.1.0"
__all__ = ["BottleneckConfig"]
