"""One call of a model with virtual tokens: rewrite its inputs on the way in and its outputs on the way out.

A :class:`VirtualTokenCall` installs torch forward hooks on the base model
for the duration of one ``PeftModel`` forward or one whole ``generate()``, so
every step of generation is handled the same way:

* a step with an empty cache (the first one, or every one without a cache)
  gets the virtual tokens prepended: ``input_ids`` become ``inputs_embeds``,
  and the attention mask, ``position_ids``, ``token_type_ids`` and labels
  grow by ``num_virtual_tokens`` (ones, ``0..n-1`` then the user's positions
  shifted by ``n``, zeros, ``-100``);
* a later step reads a cache that already holds the virtual tokens, so only
  its attention mask (which covers the user's tokens) and positions shift.

Encoder-decoder models get the tokens on the encoder's input: a hook on the
encoder handles ``generate()``, which runs the encoder on its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit import PeftkitError

Layout = Literal["tokens", "sequence", "span", "seq2seq"]
IGNORE_INDEX = -100
# Keyword inputs with one row per batch row, copied once per prompt of an ensemble.
_BATCH_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "token_type_ids",
    "labels",
    "start_positions",
    "end_positions",
    "decoder_input_ids",
    "decoder_inputs_embeds",
    "decoder_attention_mask",
    "decoder_position_ids",
)
# Outputs with one entry per input position, by layout; their virtual positions are dropped.
_PER_TOKEN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "tokens": ("logits", "hidden_states", "last_hidden_state"),
    "sequence": ("hidden_states", "last_hidden_state"),
    "span": ("start_logits", "end_logits", "hidden_states", "last_hidden_state"),
    "seq2seq": (),  # the decoder's outputs; the encoder's (kept for reuse as encoder_outputs) hold the virtual tokens
}
# Outputs left as the model returns them: attentions cannot drop positions without renormalising, and a cache
# must keep the virtual tokens (and an ensemble's copies) for the next step.
_KEPT_OUTPUTS = ("loss", "past_key_values", "attentions", "cross_attentions", "decoder_attentions")


class VirtualTokenInputError(PeftkitError, ValueError):
    """A call's inputs cannot carry virtual tokens (wrong shapes, missing input, unsupported option)."""


@dataclass
class _Record:
    prepended: int  # virtual positions this call added to the sequence (0 on a step that reads the cache)
    length: int  # the user's sequence length in this call
    batch: int  # the user's batch size
    as_tuple: bool  # the caller asked for return_dict=False
    spans: tuple[torch.Tensor, torch.Tensor] | None = None  # answer spans of a question-answering call


class VirtualTokenCall:
    """The hooks for one call; ``prompts()`` gives the tokens as ``(num_prompts, num_virtual_tokens, dim)``."""

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        prompts: Callable[[], torch.Tensor],
        num_virtual_tokens: int,
        num_prompts: int,
    ) -> None:
        self.model = model
        self.layout = layout
        self.prompts = prompts
        self.n = num_virtual_tokens
        self.copies = num_prompts
        self.records: list[_Record] = []
        self.batch_tiled = False  # set while a seq2seq forward passes already-tiled inputs to its encoder

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Hook the model (and its encoder) for the duration of the block."""
        handles = [
            self.model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.model.register_forward_hook(self._after_model, with_kwargs=True),
        ]
        if self.layout == "seq2seq":
            handles.append(self.model.get_encoder().register_forward_pre_hook(self._before_encoder, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.records.clear()
            self.batch_tiled = False

    # ------------------------------------------------------------ the model
    def _before_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[()], dict[str, Any]]:
        kwargs = _as_keywords(module, args, kwargs)
        as_tuple = kwargs.get("return_dict") is False
        if as_tuple:
            kwargs["return_dict"] = True
        if self.layout == "seq2seq":
            batch, length = self._seq2seq_inputs(kwargs)
            self.records.append(_Record(0, length, batch, as_tuple))
            return (), kwargs
        source = _main_input(kwargs, "input_ids", "inputs_embeds")
        batch, length = source.shape[:2]
        kwargs = self._tile(kwargs, batch, _BATCH_INPUTS)
        past = _cache_length(kwargs.get("past_key_values"))
        if past == 0:
            kwargs = self._prepend(kwargs, length)
            prepended = self.n
        else:
            kwargs = self._continue(kwargs, past, length)
            prepended = 0
        spans = None
        if self.layout == "span" and kwargs.get("start_positions") is not None:
            spans = (kwargs.pop("start_positions"), kwargs.pop("end_positions"))  # the loss is taken afterwards
        self.records.append(_Record(prepended, length, batch, as_tuple, spans))
        return (), kwargs

    def _after_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        record = self.records.pop()
        self.batch_tiled = False
        if not hasattr(output, "to_tuple"):
            return output
        per_token = _PER_TOKEN_OUTPUTS[self.layout] if record.prepended else ()
        for key, value in list(output.items()):
            if key not in _KEPT_OUTPUTS and not key.startswith("encoder_"):
                output[key] = self._to_user_shape(value, record, strip=key in per_token)
        if record.spans is not None:
            output["loss"] = _span_loss(output["start_logits"], output["end_logits"], *record.spans)
            output.move_to_end("loss", last=False)
        return output.to_tuple() if record.as_tuple else output

    def _to_user_shape(self, value: Any, record: _Record, strip: bool) -> Any:
        """Drop the virtual positions (dim 1) of a per-token output, and average an ensemble's copies."""
        if isinstance(value, tuple):
            return tuple(self._to_user_shape(v, record, strip) for v in value)
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if strip and value.dim() >= 2 and value.shape[1] > record.length:
            value = value[:, value.shape[1] - record.length :]
        return self._average(value, record.batch)

    def _seq2seq_inputs(self, kwargs: dict[str, Any]) -> tuple[int, int]:
        """Tile an encoder-decoder call; the encoder hook adds the tokens, here only the encoder mask grows."""
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            source = _main_input(kwargs, "input_ids", "inputs_embeds")
        else:
            source = _main_input(kwargs, "decoder_input_ids", "decoder_inputs_embeds", "labels")
        batch, length = source.shape[:2]
        self._tile(kwargs, batch, _BATCH_INPUTS)
        mask = kwargs.get("attention_mask")
        if encoder_outputs is None:
            self.batch_tiled = True
            if mask is not None:
                kwargs["attention_mask"] = self._grow_mask(mask, length)
        elif mask is not None and mask.shape[-1] != encoder_outputs[0].shape[1]:  # not yet covering the tokens
            kwargs["attention_mask"] = self._grow_mask(mask, encoder_outputs[0].shape[1] - self.n)
        return batch, length

    # ---------------------------------------------------------- the encoder
    def _before_encoder(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[()], dict[str, Any]]:
        kwargs = _as_keywords(module, args, kwargs)
        source = _main_input(kwargs, "input_ids", "inputs_embeds")
        batch, length = source.shape[:2]
        if not self.batch_tiled:  # generate() runs the encoder on its own
            kwargs = self._tile(kwargs, batch, ("input_ids", "inputs_embeds", "attention_mask"))
        self.batch_tiled = False
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] != length + self.n:  # generate() passes the user's mask here
            kwargs["attention_mask"] = self._grow_mask(mask, length)
        kwargs["inputs_embeds"] = self._with_prompts(kwargs, module)
        kwargs["input_ids"] = None
        return (), kwargs

    # -------------------------------------------------------------- helpers
    def _prepend(self, kwargs: dict[str, Any], length: int) -> dict[str, Any]:
        """Put the virtual tokens before the user's tokens (a step whose cache is empty)."""
        n = self.n
        kwargs["inputs_embeds"] = self._with_prompts(kwargs, self.model)
        kwargs["input_ids"] = None
        rows = kwargs["inputs_embeds"].shape[0]
        if (mask := kwargs.get("attention_mask")) is not None:
            kwargs["attention_mask"] = self._grow_mask(mask, length)
        if (positions := kwargs.get("position_ids")) is not None:
            first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([first, positions + n], dim=-1)
        if (token_types := kwargs.get("token_type_ids")) is not None:
            kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(rows, n), token_types], dim=1)
        if self.layout == "tokens" and (labels := kwargs.get("labels")) is not None:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)
        if kwargs.get("cache_position") is not None:  # transformers < 5
            kwargs["cache_position"] = torch.arange(n + length, device=kwargs["inputs_embeds"].device)
        return kwargs

    def _continue(self, kwargs: dict[str, Any], past: int, length: int) -> dict[str, Any]:
        """A step after the first: the cache holds the virtual tokens; shift the mask and positions to match."""
        if (mask := kwargs.get("attention_mask")) is not None:
            if mask.dim() != 2:
                raise VirtualTokenInputError(f"virtual tokens need a 2D attention_mask, got {mask.dim()} dimensions")
            if mask.shape[-1] == past + length - self.n:
                kwargs["attention_mask"] = _cat_ones(mask, self.n)
            elif mask.shape[-1] != past + length:
                raise VirtualTokenInputError(
                    f"attention_mask covers {mask.shape[-1]} positions; with {past} cached (of which {self.n} are "
                    f"virtual tokens) and {length} new ones it should cover {past + length - self.n}"
                )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.n
        if kwargs.get("cache_position") is not None:  # transformers < 5
            kwargs["cache_position"] = torch.arange(past, past + length, device=kwargs["cache_position"].device)
        return kwargs

    def _with_prompts(self, kwargs: dict[str, Any], owner: nn.Module) -> torch.Tensor:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = owner.get_input_embeddings()(kwargs["input_ids"])
        rows = embeds.shape[0]
        prompts = self.prompts()  # (copies, n, dim)
        prompts = prompts[:, None].expand(-1, rows // self.copies, -1, -1).reshape(rows, self.n, -1)
        return torch.cat([prompts.to(device=embeds.device, dtype=embeds.dtype), embeds], dim=1)

    def _grow_mask(self, mask: torch.Tensor, length: int) -> torch.Tensor:
        if mask.dim() != 2 or mask.shape[-1] != length:
            raise VirtualTokenInputError(
                f"virtual tokens need a 2D attention_mask of the input's length {length}, got shape {tuple(mask.shape)}"
            )
        return _cat_ones(mask, self.n)

    def _tile(self, kwargs: dict[str, Any], batch: int, keys: tuple[str, ...]) -> dict[str, Any]:
        """Repeat the batch once per prompt (prompt-major: row ``k * batch + b`` uses prompt ``k``)."""
        if self.copies == 1:
            return kwargs
        for key in keys:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                kwargs[key] = torch.cat([value] * self.copies)
        return kwargs

    def _average(self, value: torch.Tensor, batch: int) -> torch.Tensor:
        """The mean over an ensemble's prompts, back to the user's batch size."""
        if self.copies == 1 or value.shape[0] != self.copies * batch:
            return value
        return value.reshape(self.copies, batch, *value.shape[1:]).mean(dim=0)


def _span_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """transformers' question-answering loss, over the user's positions only (out-of-range answers ignored)."""
    length = start_logits.shape[1]
    losses = [
        nn.functional.cross_entropy(logits, positions.clamp(0, length), ignore_index=length)
        for logits, positions in ((start_logits, starts), (end_logits, ends))
    ]
    return (losses[0] + losses[1]) / 2


def _cat_ones(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _main_input(kwargs: dict[str, Any], *names: str) -> torch.Tensor:
    for name in names:
        value = kwargs.get(name)
        if value is not None:
            if name.endswith("input_ids") and value.dim() != 2 or name.endswith("embeds") and value.dim() != 3:
                raise VirtualTokenInputError(
                    f"virtual tokens need {name} of shape (batch, length{', dim' if 'embeds' in name else ''}), "
                    f"got {tuple(value.shape)}"
                )
            return value
    raise VirtualTokenInputError(f"a model with virtual tokens needs one of {', '.join(names)}")


def _cache_length(past: Any) -> int:
    """How many positions a key/value cache holds (0 for none or an empty one)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


@functools.lru_cache(maxsize=64)
def _forward_parameters(module_type: type[nn.Module]) -> tuple[str, ...]:
    return tuple(inspect.signature(module_type.forward).parameters)[1:]  # drop self


def _as_keywords(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as keywords, so positional ``input_ids`` are rewritten too."""
    kwargs = dict(kwargs)
    if args:
        names = _forward_parameters(type(module))
        for name, value in zip(names, args, strict=False):
            kwargs[name] = value
    return kwargs
