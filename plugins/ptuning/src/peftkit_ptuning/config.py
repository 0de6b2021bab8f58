"""PromptEncoderConfig: Hugging Face PEFT's P-tuning fields, with the same names and defaults (no torch here)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError
from peftkit_prompt import PromptLearningConfig

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # PEFT's MLP always has this many hidden layers, whatever encoder_num_layers says


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021): virtual tokens made by a prompt encoder from trained input embeddings.

    ``encoder_reparameterization_type``: ``"MLP"`` (Linear-ReLU-Linear-ReLU-Linear,
    ``encoder_num_layers`` unused, as in PEFT) or ``"LSTM"`` (a bidirectional
    LSTM of ``encoder_num_layers`` layers and ``encoder_dropout`` between them,
    then a two-layer MLP). ``encoder_hidden_size`` defaults to ``token_dim``.
    The saved file holds the encoder's output, not the encoder (PEFT's format).
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = MLP_LAYERS
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        self.encoder_reparameterization_type = kind
        if kind not in ENCODER_TYPES:
            raise ConfigError(f"encoder_reparameterization_type must be one of {ENCODER_TYPES}, got {kind!r}")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or None, got {hidden!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if kind == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            warnings.warn(
                f"encoder_num_layers is ignored for the MLP encoder, which has exactly {MLP_LAYERS} hidden layers "
                f"(as in PEFT)",
                stacklevel=3,
            )

    def resolve(self, model_config: Any) -> None:
        super().resolve(model_config)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
