"""P-tuning's module: trained input embeddings passed through a prompt encoder (MLP or bidirectional LSTM)."""

from __future__ import annotations

import torch
from torch import nn

from peftkit_prompt.adapter import VirtualTokenAdapter, VirtualTokenModule, inject_virtual_tokens
from peftkit_ptuning.config import PromptEncoderConfig


class PromptEncoder(VirtualTokenModule):
    """PEFT's ``PromptEncoder``: ``embedding`` plus ``mlp_head`` (and ``lstm_head`` for LSTM).

    An adapter loaded from a file has no encoder: the file holds the encoder's
    output (PEFT's format), which becomes ``embedding`` and is used as is
    (and trained as is, when loaded with ``is_trainable=True``).
    """

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        assert config.token_dim is not None and config.encoder_hidden_size is not None
        dim, hidden = config.token_dim, config.encoder_hidden_size
        device = word_embeddings.weight.device
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim, device=device)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            layers = [nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)]
        else:
            layers = [nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)]
        self.mlp_head = nn.Sequential(*layers).to(device)

    def table(self) -> torch.Tensor:
        tokens = self.embedding.weight[None]  # one prompt: (1, total_virtual_tokens, dim)
        if self.mlp_head is None:
            return tokens
        if self.lstm_head is not None:
            tokens = self.lstm_head(tokens)[0]
        return self.mlp_head(tokens)

    def saved_embeddings(self) -> torch.Tensor:
        """The encoder's output in eval mode (no dropout), as PEFT saves it."""
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.table()[0]
        finally:
            self.train(training)

    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.to(self.embedding.weight.dtype))
        self.lstm_head = None  # the file holds the encoder's output: drop the encoder
        self.mlp_head = None


def inject(model: nn.Module, config: PromptEncoderConfig, adapter_name: str) -> VirtualTokenAdapter:
    """Add a P-tuning adapter: a :class:`PromptEncoder` in the model's virtual-token store."""
    return inject_virtual_tokens(model, config, adapter_name, lambda embeddings: PromptEncoder(config, embeddings))
