"""peftkit-prompt: prompt tuning for peftkit, and the virtual-token machinery other input methods share.

Importing this package does not import torch (only the configs are defined here).
"""

from peftkit_prompt.config import PromptLearningConfig, PromptTuningConfig

__version__ = "0.1.0"
__all__ = ["PromptLearningConfig", "PromptTuningConfig"]
