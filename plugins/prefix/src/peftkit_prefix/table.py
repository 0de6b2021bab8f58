"""The trainable table of key/value prefixes, optionally produced by a reparameterisation MLP."""

from __future__ import annotations

import torch
from torch import nn


class PrefixTable(nn.Module):
    """``num_virtual_tokens`` rows of ``width`` features: every layer's prefix keys and values.

    With ``projection_size`` the rows are computed as ``MLP(embedding)`` (an
    embedding of ``token_dim`` features, then Linear-Tanh-Linear through
    ``projection_size`` hidden units), as in Hugging Face PEFT's ``PrefixEncoder``;
    :meth:`fold` replaces the MLP by the rows it produces. ``dropout`` applies
    to each batch row's copy of the prefixes in training mode.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        width: int,
        token_dim: int | None = None,
        projection_size: int | None = None,
        zero_init: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.transform: nn.Sequential | None = None
        if projection_size:
            assert token_dim is not None, "a projected prefix table needs token_dim"
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, projection_size), nn.Tanh(), nn.Linear(projection_size, width)
            )
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)
        self.dropout = nn.Dropout(dropout)
        self.width = width

    def rows(self) -> torch.Tensor:
        """The prefixes as a ``(num_virtual_tokens, width)`` tensor (through the MLP if there is one)."""
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prefixes for a batch: ``(batch_size, num_virtual_tokens, width)``, dropout applied in training."""
        rows = self.rows().unsqueeze(0).expand(batch_size, -1, -1)
        return self.dropout(rows) if self.training and self.dropout.p > 0 else rows

    def fold(self, rows: torch.Tensor | None = None) -> None:
        """Drop the MLP and keep ``rows`` (default: what the MLP produces now) as the trained table."""
        old = self.embedding.weight
        with torch.no_grad():
            rows = (self.rows() if rows is None else rows).detach().to(device=old.device, dtype=old.dtype).clone()
        self.embedding = nn.Embedding.from_pretrained(rows, freeze=not old.requires_grad)
        self.transform = None
