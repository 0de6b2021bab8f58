"""peftkit-ptuning-v2: deep prompts, trainable key/value prefixes at every layer (Liu et al., 2022).

Importing this package does not import torch.
"""

from peftkit_ptuning_v2.config import PTuningV2Config, prefix_tuning_config

__all__ = ["PTuningV2Config", "prefix_tuning_config"]
