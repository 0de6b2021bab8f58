"""PrefixTuningConfig: Hugging Face PEFT's prefix-tuning fields, with the same names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit import ConfigError, PeftConfig

# Hugging Face PEFT writes a prompt-learning method's modules_to_save under "base_model.", not "base_model.model.".
PROMPT_LEARNING_PREFIX = "base_model."


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Trainable key/value prefixes of ``num_virtual_tokens`` positions in every attention layer.

    ``prefix_projection=True`` trains the prefixes through a two-layer MLP
    (``token_dim -> encoder_hidden_size -> all layers' keys and values``), as in
    Li & Liang (2021); the saved file holds only the prefixes the MLP produces.
    ``init_weights="zero"`` starts the prefixes (or the MLP's last layer) at zero.
    ``token_dim``, ``num_attention_heads``, ``num_layers``,
    ``num_transformer_submodules`` and ``encoder_hidden_size`` are read from the
    model when left ``None``; ``token_dim`` and ``num_attention_heads`` describe
    the key/value heads (``num_key_value_heads * head_dim`` under grouped-query attention).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(
            self, "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"
        )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}"
            )
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")


def check_positive(config: PeftConfig, *names: str) -> None:
    """Raise ConfigError unless each named field is a positive integer or None (``num_virtual_tokens`` is required)."""
    for name in names:
        value = getattr(config, name)
        if value is None and name != "num_virtual_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
