"""Prompt tuning's module: one trained embedding per virtual token (and per prompt of an ensemble)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit import InjectError
from peftkit_prompt.adapter import VirtualTokenAdapter, VirtualTokenModule, inject_virtual_tokens
from peftkit_prompt.config import PromptTuningConfig


class PromptEmbedding(VirtualTokenModule):
    """``num_prompts * total_virtual_tokens`` trained vectors, PEFT's ``embedding`` table for one prompt.

    Initialised as the config says, except in inference mode (an adapter being
    loaded), where the table is about to be overwritten and no tokenizer is needed.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        assert config.token_dim is not None
        self.num_prompts = config.num_prompts
        self.total_virtual_tokens = config.total_virtual_tokens
        rows = self.num_prompts * self.total_virtual_tokens
        self.embedding = nn.Embedding(rows, config.token_dim, device=word_embeddings.weight.device)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (rows,), device=word_embeddings.weight.device)
        else:
            token_ids = text_token_ids(config, rows).to(word_embeddings.weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(token_ids).float())

    def table(self) -> torch.Tensor:
        return self.embedding.weight.view(self.num_prompts, self.total_virtual_tokens, -1)

    def saved_embeddings(self) -> torch.Tensor:
        return self.embedding.weight

    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.to(self.embedding.weight.dtype))


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> VirtualTokenAdapter:
    """Add a prompt-tuning adapter: a :class:`PromptEmbedding` in the model's virtual-token store."""
    return inject_virtual_tokens(model, config, adapter_name, lambda embeddings: PromptEmbedding(config, embeddings))


def text_token_ids(config: PromptTuningConfig, count: int) -> torch.Tensor:
    """The tokens of ``prompt_tuning_init_text`` (with special tokens, as in PEFT), repeated or cut to ``count``."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run a tokenizer's remote code to initialise a prompt
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InjectError(
            f"cannot load tokenizer {config.tokenizer_name_or_path!r} for prompt_tuning_init='TEXT': {exc}"
        ) from exc
    token_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not token_ids:
        raise InjectError("prompt_tuning_init_text tokenizes to no token; give a non-empty text")
    token_ids = (token_ids * math.ceil(count / len(token_ids)))[:count]
    return torch.tensor(token_ids, dtype=torch.long)
