"""What a model's attention looks like, and which prefix slot each of its layers reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit import InjectError


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a transformers model's key/value states, read from its config."""

    is_encoder_decoder: bool
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    decoder_layers: int  # layers of the stack that reads ``past_key_values`` (the only stack, or the decoder)
    encoder_layers: int  # layers of the encoder of an encoder-decoder model, else 0

    @property
    def kv_width(self) -> int:
        """Key (or value) features per token and layer: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class PrefixLayout:
    """How a table of ``slots`` (key, value) pairs maps onto a model's layers.

    ``decoder_slots[i]`` is the slot layer ``i`` of the stack that reads the
    model's ``past_key_values`` uses; ``encoder_slots[i]`` the slot of encoder
    layer ``i`` of an encoder-decoder model (empty: the encoder gets no prefix).
    """

    num_virtual_tokens: int
    num_kv_heads: int
    head_dim: int
    slots: int
    decoder_slots: tuple[int, ...]
    encoder_slots: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Features per virtual token in the table: ``slots * 2 * num_kv_heads * head_dim``."""
        return self.slots * 2 * self.num_kv_heads * self.head_dim


def model_geometry(model: nn.Module) -> ModelGeometry:
    """Read layer counts and key/value heads from a transformers model's config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise InjectError(f"{type(model).__name__} is not a transformers model; key/value prefixes need one")
    text = config.get_text_config(decoder=True)
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    layers = _first(text, "num_hidden_layers", "num_layers", "n_layer")
    if not encoder_decoder:
        return ModelGeometry(False, hidden, heads, kv_heads, head_dim, layers, 0)
    decoder_layers = getattr(text, "num_decoder_layers", None) or layers
    return ModelGeometry(True, hidden, heads, kv_heads, head_dim, decoder_layers, layers)


def fill_shape_fields(config: Any, geometry: ModelGeometry) -> None:
    """Set the unset shape fields of a prefix config as Hugging Face PEFT does, in place.

    Under grouped-query attention (a ``num_key_value_heads`` in the model config)
    ``token_dim`` and ``num_attention_heads`` describe the key/value heads.
    """
    if config.num_layers is None:
        config.num_layers = geometry.encoder_layers or geometry.decoder_layers
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if geometry.is_encoder_decoder else 1
    if geometry.num_kv_heads != geometry.num_attention_heads:
        config.token_dim = config.token_dim or geometry.kv_width
        config.num_attention_heads = config.num_attention_heads or geometry.num_kv_heads
    else:
        config.token_dim = config.token_dim or geometry.hidden_size
        config.num_attention_heads = config.num_attention_heads or geometry.num_attention_heads


def check_shape_fields(config: Any, geometry: ModelGeometry, method: str) -> None:
    """Raise InjectError when the config's key/value shape or stack count does not fit the model."""
    heads, token_dim = config.num_attention_heads, config.token_dim
    if token_dim % heads or (heads, token_dim // heads) != (geometry.num_kv_heads, geometry.head_dim):
        raise InjectError(
            f"{method}: token_dim={token_dim} and num_attention_heads={heads} describe key/value heads of "
            f"{token_dim / heads:g} features, but this model's attention has {geometry.num_kv_heads} key/value heads of "
            f"{geometry.head_dim}; leave both fields unset to read them from the model"
        )
    wanted = 2 if geometry.is_encoder_decoder else 1
    if config.num_transformer_submodules != wanted:
        kind = "an encoder-decoder" if wanted == 2 else "a single-stack"
        raise InjectError(
            f"{method}: num_transformer_submodules={config.num_transformer_submodules} does not fit {kind} model, "
            f"which needs {wanted}; leave it unset to read it from the model"
        )


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise InjectError(f"cannot read any of {names} from {type(config).__name__}; set the prefix shape fields yourself")
