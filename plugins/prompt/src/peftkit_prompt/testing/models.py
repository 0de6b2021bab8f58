"""Tiny models, inputs and helpers for testing virtual-token methods (no Hub, no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from peftkit.testing.models import sample_inputs, tiny_model

KINDS = ("llama", "gpt2", "bert", "bert-token", "t5")
GENERATIVE_KINDS = ("llama", "gpt2", "t5")
# The task type each tiny model is, in PEFT's words.
TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "bert-token": "TOKEN_CLS",
    "t5": "SEQ_2_SEQ_LM",
}
# Kinds whose PEFT logits include the virtual positions (PEFT does not strip them).
PEFT_KEEPS_VIRTUAL = ("llama", "gpt2", "bert-token")
VOCAB = 64


def tiny(kind: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model: peftkit's test models plus a BERT token classifier (``"bert-token"``)."""
    if kind != "bert-token":
        return tiny_model(kind, seed)
    config = tf.BertConfig(
        vocab_size=VOCAB,
        pad_token_id=0,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return tf.BertForTokenClassification(config).eval()


def inputs(kind: str, labels: bool = False) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for ``tiny(kind)`` (token labels for the token classifier)."""
    if kind != "bert-token":
        return sample_inputs(kind, labels=labels)
    batch = sample_inputs("bert")
    if labels:
        batch["labels"] = torch.randint(0, 3, batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    return batch


def user_positions(logits: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    """PEFT's logits at the user's tokens: it returns the virtual positions too for token-level models."""
    return logits[:, n:] if kind in PEFT_KEEPS_VIRTUAL else logits


def randomise_heads(model: nn.Module, seed: int = 3) -> None:
    """Move trained-in-full head copies off the base weights, so a wrong head would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator))


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch, **extra).logits


def word_level_tokenizer(directory: Path) -> Path:
    """Save a tiny word-level tokenizer (``"w3"`` is token 3, ``<bos>`` is 1) to ``directory``; no Hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(directory)
    return directory


def padded(rows: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """A batch of 1D token rows of different lengths, padded (id 0, mask 0) on the ``"left"`` or ``"right"``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, place] = row
        mask[i, place] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate_by_forward(
    model: nn.Module, kind: str, prompt: dict[str, torch.Tensor], steps: int, sample: bool
) -> torch.Tensor:
    """What ``generate(max_new_tokens=steps, min_new_tokens=steps)`` should return, by full forwards, no cache.

    Greedy, or (``sample=True``) one ``torch.multinomial`` draw per step from the
    softmax of the logits, as ``generate(do_sample=True, top_k=0)`` draws.
    """
    config = model.config
    if kind == "t5":
        tokens = torch.full((prompt["input_ids"].shape[0], 1), config.decoder_start_token_id)
    else:
        tokens = prompt["input_ids"]
    mask = prompt["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):
            if kind == "t5":
                logits = model(**prompt, decoder_input_ids=tokens).logits[:, -1]
            else:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits[:, -1]
            logits[:, config.eos_token_id] = -float("inf")  # as min_new_tokens does
            if sample:
                chosen = torch.multinomial(logits.softmax(-1), num_samples=1)
            else:
                chosen = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, chosen], dim=1)
            mask = torch.cat([mask, torch.ones_like(chosen)], dim=1) if kind != "t5" else mask
    return tokens
