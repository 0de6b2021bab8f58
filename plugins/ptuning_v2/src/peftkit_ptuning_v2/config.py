"""PTuningV2Config: deep prompts at every layer, with fields named as in Hugging Face PEFT's prefix tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit import ConfigError, PeftConfig
from peftkit_prefix import PrefixTuningConfig
from peftkit_prefix.config import check_positive


@dataclass
class PTuningV2Config(PeftConfig):
    """Trainable key/value prompts of ``num_virtual_tokens`` positions in every attention layer.

    No reparameterisation: the prompts are the trained parameters.
    ``prefix_dropout`` drops prompt features in training (the paper's code used
    the model's hidden dropout, 0.1 for BERT). On an encoder-decoder model
    (``num_transformer_submodules=2``) every layer of the encoder and of the
    decoder gets its own prompts. ``token_dim``, ``num_attention_heads``,
    ``num_layers`` (layers per stack) and ``num_transformer_submodules`` are read
    from the model when left ``None``, as for prefix tuning.
    """

    peft_type: ClassVar[str] = "P_TUNING_V2"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    init_weights: str | None = None
    prefix_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}"
            )
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ConfigError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout!r}")


def prefix_tuning_config(config: PTuningV2Config) -> PrefixTuningConfig:
    """The prefix-tuning config under which a single-stack P-tuning v2 adapter's file means the same.

    The saved ``prompt_embeddings`` of a decoder-only or encoder-only model are
    laid out exactly as prefix tuning's (``prefix_projection=False``); write this
    config next to them and Hugging Face PEFT loads the adapter. An
    encoder-decoder adapter has no prefix-tuning equivalent (PEFT gives the
    encoder no prefixes) and raises :class:`peftkit.ConfigError`.
    """
    if config.num_transformer_submodules != 1:
        raise ConfigError(
            "only a single-stack P-tuning v2 adapter (num_transformer_submodules=1, after it was added to a model) "
            "has a prefix-tuning equivalent; an encoder-decoder one also prompts the encoder"
        )
    return PrefixTuningConfig(
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=config.inference_mode,
        modules_to_save=config.modules_to_save,
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=config.token_dim,
        num_transformer_submodules=1,
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_layers,
        init_weights=config.init_weights,
        encoder_hidden_size=config.token_dim,
    )
