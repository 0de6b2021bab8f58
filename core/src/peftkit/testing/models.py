"""Tiny real transformers models with seeded random weights, and sample inputs for them.

Each model has two layers, a hidden size of 16 and a vocabulary of 64, so a
forward pass takes milliseconds on a CPU. Dropout is off, so train and eval
mode compute the same function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_KINDS = ("llama", "gpt2", "bert", "t5")
GENERATIVE_KINDS = ("llama", "gpt2", "t5")
VOCAB = 64
BATCH, SEQ_LEN, TARGET_LEN = 2, 6, 4
# Larger than the models' default of 0.02, so that adapters visibly move the logits.
INIT_RANGE = 0.2


# kind -> (model class, config class, config fields) in transformers; all share VOCAB and pad id 0.
_ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": INIT_RANGE,
    }),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {
        "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": INIT_RANGE,
    }),
    "bert": ("BertForSequenceClassification", "BertConfig", {
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64, "num_labels": 2, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": INIT_RANGE,
    }),
    "t5": ("T5ForConditionalGeneration", "T5Config", {
        "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2, "dropout_rate": 0.0,
        "decoder_start_token_id": 0, "eos_token_id": 1,
    }),
}


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh model of ``kind`` (see :data:`MODEL_KINDS`) in eval mode; equal seeds give equal weights."""
    import torch
    import transformers

    if kind not in _ARCHITECTURES:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    model_class, config_class, fields = _ARCHITECTURES[kind]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    model: nn.Module = getattr(transformers, model_class)(config)
    return model.eval()


def sample_inputs(kind: str, labels: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward of ``tiny_model(kind)``; with ``labels`` the model returns a loss."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if kind == "t5":
        targets = torch.randint(3, VOCAB, (BATCH, TARGET_LEN), generator=generator)
        if labels:
            inputs["labels"] = targets
        else:
            start = torch.zeros((BATCH, 1), dtype=targets.dtype)
            inputs["decoder_input_ids"] = torch.cat([start, targets[:, :-1]], dim=1)
    elif labels and kind == "bert":
        inputs["labels"] = torch.tensor([0, 1])
    elif labels:
        inputs["labels"] = input_ids.clone()
    return inputs
