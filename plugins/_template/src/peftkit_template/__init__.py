"""peftkit-template: the "shift" method, a learned vector added to the output of each target layer.

Importing this package does not import torch (only the config is defined here).
"""

from peftkit_template.config import ShiftConfig

__version__ = "0.1.0"
__all__ = ["ShiftConfig"]
