"""Key/value caches that hold an adapter's prefixes, as transformers models consume them.

Two kinds: a *storing* cache (a plain ``DynamicCache`` / ``EncoderDecoderCache``
pre-filled with the prefixes, which grows during generation and is returned to
the caller), and a *read-only* cache for calls that keep no cache (``use_cache=False``,
encoders, training under gradient checkpointing): it puts the prefixes in front
of each layer's keys and values but stores nothing, so running a layer twice
(as checkpointing's recomputation does) sees the same keys.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from peftkit_prefix.errors import PrefixInputError

OWNER = "_peftkit_prefix_owner"  # attribute naming the adapter whose prefixes a storing cache holds


class PrefixOnlyLayer(DynamicLayer):
    """One layer's prefix: ``update`` returns prefix + new states and keeps nothing."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        if keys is not None and values is not None:
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            return key_states, value_states
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        return keys, torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)


class PrefixOnlyCache(DynamicCache):
    """A read-only cache: the prefixes of each layer, nothing else (layers beyond the list pass through)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        Cache.__init__(self, layers=[PrefixOnlyLayer(k, v) for k, v in pairs])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            return key_states, value_states
        return self.layers[layer_idx].update(key_states, value_states)


class _NeverUpdated(dict):
    """``is_updated`` of a read-only encoder-decoder cache: cross-attention states are never kept."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class PrefixOnlyEncoderDecoderCache(EncoderDecoderCache):
    """Read-only prefixes for the decoder's self-attention; cross-attention recomputes its states every call."""

    def __init__(self, self_attention: PrefixOnlyCache) -> None:
        super().__init__(self_attention, PrefixOnlyCache([]))
        self.is_updated = _NeverUpdated()


READ_ONLY = (PrefixOnlyCache, PrefixOnlyEncoderDecoderCache)


def read_only_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], encoder_decoder: bool) -> Cache:
    """A read-only cache holding ``pairs[i]`` (keys, values) for layer ``i``."""
    cache = PrefixOnlyCache(pairs)
    return PrefixOnlyEncoderDecoderCache(cache) if encoder_decoder else cache


def storing_cache(model_config: Any, encoder_decoder: bool) -> Cache:
    """An empty cache of the kind the model would build itself for generation."""
    if encoder_decoder:
        return EncoderDecoderCache(DynamicCache(config=model_config), DynamicCache(config=model_config))
    return DynamicCache(config=model_config)


def fill(cache: Cache, pairs: list[tuple[torch.Tensor, torch.Tensor]], owner: str) -> None:
    """Write the prefixes into an empty storing cache and mark it as holding ``owner``'s prefixes."""
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer_idx, (keys, values) in enumerate(pairs):
        target.update(keys, values, layer_idx)
    setattr(cache, OWNER, owner)


def continues(cache: Any, owner: str) -> bool:
    """Whether ``cache`` is a storing cache that already holds ``owner``'s prefixes (a later generation step).

    ``False`` for no cache, a read-only cache or an empty one (the prefixes go in
    fresh); a cache with other contents raises :class:`PrefixInputError`.
    """
    if cache is None or isinstance(cache, READ_ONLY):
        return False
    if not isinstance(cache, Cache):
        raise PrefixInputError(
            f"past_key_values must be a transformers Cache, got {type(cache).__name__}; legacy tuples are not supported"
        )
    if cache.is_compileable:
        raise PrefixInputError(
            f"{type(cache).__name__} is a fixed-size cache with no room for the {owner!r} adapter's prefixes; "
            f"generate with the default dynamic cache (no cache_implementation)"
        )
    holder = getattr(cache, OWNER, None)
    if holder == owner:
        return True
    if holder is not None:
        raise PrefixInputError(
            f"past_key_values holds the prefixes of adapter {holder!r}, not of the active adapter {owner!r}"
        )
    if cache.get_seq_length() > 0:
        raise PrefixInputError(
            f"past_key_values already holds {cache.get_seq_length()} positions computed without adapter {owner!r}'s "
            f"prefixes, which must come first; pass an empty cache or none"
        )
    return False
