"""Configs of the virtual-token methods: Hugging Face PEFT's field names and defaults (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError, PeftConfig

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")

# Where each size lives in a transformers model config, in the order PEFT looks.
_MODEL_CONFIG_NAMES = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PromptLearningConfig(PeftConfig):
    """The fields every virtual-token method shares (PEFT's ``PromptLearningConfig``).

    ``num_virtual_tokens`` is required. ``token_dim``, ``num_layers`` and
    ``num_attention_heads`` are read from the model when left ``None``, as PEFT
    does, and written to ``adapter_config.json``. ``num_transformer_submodules``
    defaults to 2 for ``task_type="SEQ_2_SEQ_LM"`` (PEFT's convention: the saved
    table has ``2 * num_virtual_tokens`` rows, of which the encoder uses the
    first ``num_virtual_tokens``) and to 1 otherwise.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _positive_int(self.num_virtual_tokens):
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the saved table: ``num_virtual_tokens * num_transformer_submodules``."""
        assert self.num_virtual_tokens is not None
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def resolve(self, model_config: Any) -> None:
        """Fill the sizes left ``None`` from a transformers model config, as PEFT does when it adds an adapter."""
        if hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        found = {}
        for field_name, candidates in _MODEL_CONFIG_NAMES.items():
            if getattr(self, field_name) is not None:
                continue
            value = next(
                (getattr(model_config, c) for c in candidates if getattr(model_config, c, None) is not None), None
            )
            if value is None:
                raise ConfigError(
                    f"cannot read {field_name} from the model's config; set {field_name} in the adapter config"
                )
            found[field_name] = value
        for field_name, value in found.items():
            setattr(self, field_name, value)
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` trained embeddings before the input.

    ``prompt_tuning_init``: ``"RANDOM"`` (normal noise), ``"TEXT"`` (the
    embeddings of ``prompt_tuning_init_text`` tokenized with
    ``tokenizer_name_or_path``, repeated or cut to length) or
    ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary tokens).

    ``num_prompts`` is peftkit's own field (PEFT has no prompt ensembles): with
    ``num_prompts=K > 1`` the adapter holds K prompts for one task; every call
    runs each batch row once per prompt, the loss is the mean of the K prompts'
    losses (so all K train in one batch) and the logits are the mean of their
    logits (the ensemble at inference). It is written to ``adapter_config.json``
    only when it is not 1, so plain adapters stay exactly PEFT's format;
    ensemble adapters are peftkit-only (PEFT ignores the field, then refuses the
    larger ``prompt_embeddings`` table).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    num_prompts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ConfigError(
                f"prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, got {self.prompt_tuning_init!r}"
            )
        text_init = self.prompt_tuning_init == "TEXT"
        if text_init and not self.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer folder or Hub id)")
        if text_init and self.prompt_tuning_init_text is None:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text_init:
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")
        if not _positive_int(self.num_prompts):
            raise ConfigError(f"num_prompts must be a positive integer, got {self.num_prompts!r}")
        if self.num_prompts > 1 and text_init:
            raise ConfigError(
                "num_prompts > 1 with prompt_tuning_init='TEXT' would start every prompt of the ensemble equal, so "
                "they would train identically; use 'SAMPLE_VOCAB' or 'RANDOM'"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["num_prompts"] == 1:
            del data["num_prompts"]  # keep plain adapters byte-for-byte PEFT's fields
        return data
