"""peftkit-prefix: prefix tuning, trainable key/value prefixes in every attention layer.

Importing this package does not import torch.
"""

from peftkit_prefix.config import PrefixTuningConfig
from peftkit_prefix.errors import PrefixInputError

__all__ = ["PrefixInputError", "PrefixTuningConfig"]
