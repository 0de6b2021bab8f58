"""The hooks that give one forward or ``generate()`` call its prefixes.

A :class:`PrefixSession` lives for one call of the wrapped model. It installs a
forward pre-hook on the base model, so every forward, including each step of
``generate``, is rewritten: the prefixes go into ``past_key_values``, the
attention mask gets ``num_virtual_tokens`` leading ones, and position ids are
the user's positions shifted by ``num_virtual_tokens`` (the prefix occupies
positions ``0 .. num_virtual_tokens - 1``, as in Hugging Face PEFT). Padding is
read from the attention mask, so a left-padded row gets the positions of the
same row unpadded.

Transformers drops ``past_key_values`` in layers run under gradient
checkpointing. During a session the layers are told the cache is safe to keep
(it is read-only then), and pre-hooks on the layers hand it back where a model
drops it before the layers (GPT-2). The encoder of an encoder-decoder model
never receives ``past_key_values``; when the layout gives the encoder prefixes
they reach its layers the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.modeling_layers import GradientCheckpointingLayer

from peftkit_prefix import cache as caches
from peftkit_prefix.errors import PrefixInputError
from peftkit_prefix.geometry import PrefixLayout
from peftkit_prefix.table import PrefixTable

KEEP_CACHE_FLAG = "_can_checkpoint_with_cache"  # transformers' per-layer switch: keep the cache under checkpointing
Pairs = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixSession:
    """Hooks for one call: enter before the call, exit after it (``with PrefixSession(...):``)."""

    def __init__(self, model: nn.Module, table: PrefixTable, layout: PrefixLayout, owner: str) -> None:
        self.model = model
        self.table = table
        self.layout = layout
        self.owner = owner
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.encoder = model.get_encoder() if layout.encoder_slots else None
        self.encoder_blocks = _blocks(self.encoder) if self.encoder is not None else []
        self.decoder_blocks = _blocks(model.get_decoder() if self.encoder_decoder else model)
        self.signatures = {id(m): _parameters(m) for m in (model, self.encoder) if m is not None}
        self.read_only: Any = None  # the read-only cache of the current forward, for layers that lost it
        self.encoder_cache: Any = None
        self._handles: list[RemovableHandle] = []
        self._flags: list[tuple[nn.Module, Any]] = []

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> None:
        hook = self._handles.append
        hook(self.model.register_forward_pre_hook(self._rewrite_call, with_kwargs=True))
        hook(self.model.register_forward_hook(self._drop_read_only_cache))
        for block in self.decoder_blocks:
            hook(_cache_argument_hook(block, lambda: self.read_only))
        if self.encoder is not None:
            hook(self.encoder.register_forward_pre_hook(self._rewrite_encoder_call, with_kwargs=True))
            for block in self.encoder_blocks:
                hook(_cache_argument_hook(block, lambda: self.encoder_cache))
        for block in [*self.decoder_blocks, *self.encoder_blocks]:
            self._flags.append((block, block.__dict__.get(KEEP_CACHE_FLAG)))
            setattr(block, KEEP_CACHE_FLAG, True)  # only read-only caches reach checkpointed layers

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for block, own in self._flags:
            if own is None:
                block.__dict__.pop(KEEP_CACHE_FLAG, None)
            else:
                setattr(block, KEEP_CACHE_FLAG, own)
        self._handles.clear()
        self._flags.clear()
        self.read_only = self.encoder_cache = None

    # ---------------------------------------------------------------- hooks
    def _rewrite_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = _named(self.signatures[id(module)], module, args, kwargs)
        prefix = "decoder_" if self.encoder_decoder else ""
        batch, length = _batch_and_length(kwargs, prefix)
        if self.encoder_decoder and length is None and kwargs.get("labels") is not None:
            length = kwargs["labels"].shape[1]
        cache, past = self._cache_for(kwargs, batch)
        kwargs["past_key_values"] = cache
        mask_key = f"{prefix}attention_mask"
        mask = kwargs.get(mask_key)
        if mask is not None:
            kwargs[mask_key] = self._extend_mask(mask, past, length)
        if not self.encoder_decoder and "position_ids" in self.signatures[id(module)]:
            positions = kwargs.get("position_ids")
            if positions is not None:
                if past and mask is None:
                    _check_continuation(positions, past)
                kwargs["position_ids"] = positions + self.layout.num_virtual_tokens
            elif mask is not None and length is not None:
                kwargs["position_ids"] = _positions_from_mask(mask, length) + self.layout.num_virtual_tokens
        return (), kwargs

    def _rewrite_encoder_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = _named(self.signatures[id(module)], module, args, kwargs)
        batch, length = _batch_and_length(kwargs, "")
        self.encoder_cache = caches.PrefixOnlyCache(self._pairs(batch, self.layout.encoder_slots))
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._extend_mask(kwargs["attention_mask"], 0, length)
        return (), kwargs

    def _drop_read_only_cache(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Return no cache from a call that keeps none, as the base model would."""
        self.read_only = None
        if isinstance(getattr(output, "past_key_values", None), caches.READ_ONLY):
            return type(output)(**{k: v for k, v in output.items() if k != "past_key_values"})
        return output

    # -------------------------------------------------------------- helpers
    def _cache_for(self, kwargs: dict[str, Any], batch: int) -> tuple[Any, int]:
        """The cache this call runs with, and how many user positions it already holds."""
        incoming = kwargs.get("past_key_values")
        if caches.continues(incoming, self.owner):
            return incoming, incoming.get_seq_length() - self.layout.num_virtual_tokens
        pairs = self._pairs(batch, self.layout.decoder_slots)
        if self._keeps_cache(kwargs):
            reusable = incoming is not None and not isinstance(incoming, caches.READ_ONLY)  # empty: filled in place
            cache = incoming if reusable else caches.storing_cache(self.model.config, self.encoder_decoder)
            caches.fill(cache, pairs, self.owner)
            return cache, 0
        self.read_only = caches.read_only_cache(pairs, self.encoder_decoder)
        return self.read_only, 0

    def _keeps_cache(self, kwargs: dict[str, Any]) -> bool:
        """A storing cache for generative calls that ask for one, unless layers are being checkpointed."""
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", False)
        generative = self.encoder_decoder or self.model.can_generate()
        return bool(use_cache) and generative and not self._checkpointing()

    def _pairs(self, batch: int, slots: tuple[int, ...]) -> Pairs:
        """(keys, values) of shape ``(batch, kv_heads, num_virtual_tokens, head_dim)`` for each listed slot.

        Under reentrant checkpointing each layer runs its own backward pass, which
        may cross a shared MLP graph only once; so with an MLP every layer gets
        its prefixes from a separate run of it while layers are checkpointed.
        """
        if self.table.transform is not None and self._checkpointing():
            return [self._pair(self._grid(batch), slot) for slot in slots]
        grid = self._grid(batch)
        return [self._pair(grid, slot) for slot in slots]

    def _grid(self, batch: int) -> torch.Tensor:
        layout = self.layout
        rows = self.table(batch).to(self.model.dtype)
        grid = rows.view(batch, layout.num_virtual_tokens, layout.slots, 2, layout.num_kv_heads, layout.head_dim)
        return grid.permute(2, 3, 0, 4, 1, 5)  # slot, key/value, batch, head, token, feature

    @staticmethod
    def _pair(grid: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return grid[slot, 0], grid[slot, 1]

    def _checkpointing(self) -> bool:
        return any(b.gradient_checkpointing and b.training for b in (*self.decoder_blocks, *self.encoder_blocks))

    def _extend_mask(self, mask: torch.Tensor, past: int, length: int | None) -> torch.Tensor:
        if mask.dim() != 2:
            raise PrefixInputError(
                f"key/value prefixes need a 2-D attention mask (batch, positions), got {mask.dim()}-D"
            )
        if length is not None and mask.shape[1] != past + length:
            raise PrefixInputError(
                f"the attention mask covers {mask.shape[1]} positions, but the cache holds {past} user positions and the "
                f"input has {length}; pass a mask for every position so far (without the prefix)"
            )
        ones = mask.new_ones(mask.shape[0], self.layout.num_virtual_tokens)
        return torch.cat([ones, mask], dim=1)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers (those transformers can checkpoint)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _cache_argument_hook(block: nn.Module, current: Callable[[], Any]) -> RemovableHandle:
    """Give ``block`` the session's read-only cache where its caller passed ``past_key_values=None``."""
    names = list(_parameters(block))
    position = names.index("past_key_values") if "past_key_values" in names else None

    def give_back(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        cache = current()
        if cache is None:
            return None
        if position is not None and position < len(args):
            if args[position] is None:
                args = (*args[:position], cache, *args[position + 1 :])
        elif kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return args, kwargs

    return block.register_forward_pre_hook(give_back, with_kwargs=True)


def _parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``module.forward`` (without ``self``), looked up once per class."""
    return _forward_parameters(type(module))


@functools.cache
def _forward_parameters(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    try:
        parameters = list(inspect.signature(cls.forward).parameters.items())
    except (TypeError, ValueError):
        return {}
    return dict(parameters[1:])


def _named(
    parameters: dict[str, inspect.Parameter], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments all by name."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise PrefixInputError(f"{type(module).__name__} got {len(args)} positional arguments; pass inputs by name")
    return {**dict(zip(names, args)), **kwargs}


def _batch_and_length(kwargs: dict[str, Any], prefix: str) -> tuple[int, int | None]:
    """Batch size, and the number of new positions of the stack that takes the prefixes."""
    for name in (f"{prefix}input_ids", f"{prefix}inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[0], kwargs[name].shape[1]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0], None
    for value in kwargs.values():  # e.g. encoder_outputs during generation
        if isinstance(value, (tuple, dict)):
            first = next(iter(value.values() if isinstance(value, dict) else value), None)
            if isinstance(first, torch.Tensor):
                return first.shape[0], None
    raise PrefixInputError("cannot tell the batch size: pass input_ids or inputs_embeds")


def _check_continuation(positions: torch.Tensor, past: int) -> None:
    """Without padding, the first new position must follow the cached ones (it does not when ``generate()``
    is seeded with a returned cache: transformers counts the prefix as prompt tokens when slicing the input)."""
    first = positions[..., 0]
    if bool((first != past).any()):
        raise PrefixInputError(
            f"the input starts at position {int(first.min())}, but the cache already holds {past} positions after "
            f"the prefix; generate() cannot continue from a cache it returned when an adapter adds key/value prefixes: "
            f"pass the whole sequence without past_key_values"
        )


def _positions_from_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last ``length`` positions, counting only attended ones (padding is skipped)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]
