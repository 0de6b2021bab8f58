"""A key/value-prefix adapter on a model: its table, its layout, and what the other hooks do with it.

The machinery here is shared by every method whose adapter is a table of
per-layer key/value prefixes (prefix tuning, P-tuning v2): a method builds a
:class:`PrefixTable` and a :class:`PrefixLayout` and calls :func:`attach`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftkit import Adapter, AdapterLoadError, InjectError, MergeError, PeftConfig
from peftkit_prefix.config import PrefixTuningConfig
from peftkit_prefix.geometry import ModelGeometry, PrefixLayout, check_shape_fields, fill_shape_fields, model_geometry
from peftkit_prefix.runtime import PrefixSession
from peftkit_prefix.table import PrefixTable

CONTAINER = "peftkit_prefixes"  # the base model's ModuleDict of prefix tables, one per adapter
EMBEDDINGS_KEY = "prompt_embeddings"  # Hugging Face PEFT's key for the saved table


class PrefixAdapter(Adapter):
    """One adapter's prefix table, registered on the base model, and the layout that places it."""

    def __init__(
        self, name: str, config: PeftConfig, model: nn.Module, table: PrefixTable, layout: PrefixLayout
    ) -> None:
        super().__init__(name, config, [f"{CONTAINER}.{name}"])
        self.model = model
        self.table = table
        self.layout = layout
        self.active = False

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.table.parameters()

    def set_active(self, active: bool) -> None:
        self.active = active

    @contextmanager
    def forward(self, inputs: dict[str, Any], rows: dict[str, torch.Tensor] | None) -> Iterator[dict[str, Any]]:
        """Give one forward or ``generate`` call the prefixes (nothing while the adapter is disabled).

        Prefix methods take no mixed batches, so ``rows`` is always ``None``.
        """
        if not self.active:
            yield inputs
            return
        with PrefixSession(self.model, self.table, self.layout, self.name):
            yield inputs

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The prefixes under PEFT's key; a reparameterisation MLP is folded into the rows it produces."""
        with torch.no_grad():
            return {EMBEDDINGS_KEY: self.table.rows().detach().clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved prefixes back, after checking keys and shape (nothing changes on error)."""
        unexpected = sorted(set(tensors) - {EMBEDDINGS_KEY})
        if EMBEDDINGS_KEY not in tensors or unexpected:
            found = f"unexpected keys {unexpected[:5]}" if unexpected else f"no {EMBEDDINGS_KEY!r}"
            raise AdapterLoadError(
                f"{self.config.peft_type} adapter file has {found}; it holds exactly {EMBEDDINGS_KEY!r}"
            )
        rows = tensors[EMBEDDINGS_KEY]
        expected = (self.layout.num_virtual_tokens, self.layout.width)
        if tuple(rows.shape) != expected:
            raise AdapterLoadError(
                f"{EMBEDDINGS_KEY} has shape {tuple(rows.shape)}, but this model needs {expected} "
                f"(num_virtual_tokens, {self.layout.slots} layers x key and value x {self.layout.num_kv_heads} heads x "
                f"{self.layout.head_dim}); is the adapter for another base model?"
            )
        if self.table.transform is not None:
            warnings.warn(
                "the adapter file holds the prefixes without the reparameterisation MLP that produced them; "
                "training continues on the prefixes directly",
                stacklevel=4,
            )
            self.table.fold(rows)
            return
        with torch.no_grad():
            self.table.embedding.weight.copy_(rows)

    # -------------------------------------------------------------- removal
    def unload(self) -> None:
        """Remove the table from the model (and the container when it is the last one)."""
        container = getattr(self.model, CONTAINER, None)
        if container is not None and self.name in container:
            del container[self.name]
            if not len(container):
                delattr(self.model, CONTAINER)

    def merge(self) -> None:
        raise MergeError(
            f"{self.config.peft_type} adapters cannot be merged: the prefixes are extra keys and values, "
            f"not a change to any weight"
        )

    unmerge = merge


def attach(model: nn.Module, name: str, config: PeftConfig, table: PrefixTable, layout: PrefixLayout) -> PrefixAdapter:
    """Register ``table`` on ``model`` (on its device) and return the adapter."""
    reference = next(model.parameters(), None)
    if reference is not None:
        table.to(reference.device)
    container = getattr(model, CONTAINER, None)
    if container is None:
        container = nn.ModuleDict()
        model.add_module(CONTAINER, container)
    container[name] = table
    return PrefixAdapter(name, config, model, table, layout)


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixAdapter:
    """Add a prefix-tuning adapter: shape fields read from the model, then PEFT's layout and table."""
    geometry = model_geometry(model)
    fill_shape_fields(config, geometry)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    check_shape_fields(config, geometry, "prefix tuning")
    layout = peft_layout(config, geometry)
    projection = config.encoder_hidden_size if config.prefix_projection and not config.inference_mode else None
    table = PrefixTable(
        config.num_virtual_tokens,
        layout.width,
        token_dim=config.token_dim,
        projection_size=projection,
        zero_init=config.init_weights == "zero",
    )
    return attach(model, adapter_name, config, table, layout)


def peft_layout(config: PrefixTuningConfig, geometry: ModelGeometry) -> PrefixLayout:
    """Hugging Face PEFT's placement of a ``num_layers``-slot table.

    Single-stack models: layer ``i`` reads slot ``i``. Encoder-decoder models:
    only the decoder's self-attention gets prefixes, and decoder layer ``i``
    reads slot ``2 * i mod num_layers`` (PEFT repeats the table and cuts it in
    groups of four; this is what its outputs show and what its files mean).
    """
    layers = config.num_layers
    if geometry.decoder_layers != layers:
        raise InjectError(
            f"prefix tuning: num_layers={layers}, but the model's {'decoder' if geometry.is_encoder_decoder else 'stack'} "
            f"has {geometry.decoder_layers} layers"
        )
    slots = tuple((2 * i) % layers for i in range(layers)) if geometry.is_encoder_decoder else tuple(range(layers))
    return PrefixLayout(config.num_virtual_tokens, geometry.num_kv_heads, geometry.head_dim, layers, slots)
