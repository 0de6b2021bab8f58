"""peftkit-qlora: LoRA over bitsandbytes-quantized base layers, as hook wrappers around peftkit-lora.

Importing this package imports neither torch nor bitsandbytes; the functions
below load them on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.lazy import lazy_exports
from peftkit_qlora.config import QLoraConfig

if TYPE_CHECKING:
    from peftkit_qlora.adapt import QLoraMergeWarning, merge_and_unload
    from peftkit_qlora.blocks import compile_blocks
    from peftkit_qlora.optim import OptimizerInBackward
    from peftkit_qlora.quantize import BitsAndBytesUnavailableError, QuantizationError, quantize_model
    from peftkit_qlora.training import prepare_model_for_kbit_training

__version__ = "0.1.0"

__getattr__ = lazy_exports(
    __name__,
    {
        "quantize_model": "peftkit_qlora.quantize",
        "QuantizationError": "peftkit_qlora.quantize",
        "BitsAndBytesUnavailableError": "peftkit_qlora.quantize",
        "prepare_model_for_kbit_training": "peftkit_qlora.training",
        "merge_and_unload": "peftkit_qlora.adapt",
        "QLoraMergeWarning": "peftkit_qlora.adapt",
        "OptimizerInBackward": "peftkit_qlora.optim",
        "compile_blocks": "peftkit_qlora.blocks",
    },
)


__all__ = [
    "BitsAndBytesUnavailableError",
    "OptimizerInBackward",
    "QLoraConfig",
    "QLoraMergeWarning",
    "QuantizationError",
    "compile_blocks",
    "merge_and_unload",
    "prepare_model_for_kbit_training",
    "quantize_model",
]
