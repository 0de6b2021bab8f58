"""Virtual-token adapters: the shared machinery of prompt tuning and P-tuning.

A method supplies a :class:`VirtualTokenModule` (how its tokens are made and
saved); this module adds it to the model, switches it, saves and loads it
under PEFT's key ``prompt_embeddings``, and runs each call through
:class:`peftkit_prompt.calls.VirtualTokenCall`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftkit import Adapter, AdapterLoadError, InjectError, MergeError
from peftkit_prompt.calls import Layout, VirtualTokenCall, VirtualTokenInputError
from peftkit_prompt.config import PromptLearningConfig

STORE_NAME = "peftkit_virtual_tokens"  # the base model's attribute holding every virtual-token adapter
SAVED_KEY = "prompt_embeddings"  # PEFT's tensor name for prompt tuning and P-tuning


class VirtualTokenModule(nn.Module):
    """What a virtual-token method implements: its tokens, and the one table it saves."""

    def table(self) -> torch.Tensor:
        """Every virtual token, shaped ``(num_prompts, total_virtual_tokens, token_dim)``."""
        raise NotImplementedError

    def saved_embeddings(self) -> torch.Tensor:
        """The 2D tensor written as ``prompt_embeddings``."""
        raise NotImplementedError

    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        """Take back a tensor of the shape :meth:`saved_embeddings` returns (already checked)."""
        raise NotImplementedError


class VirtualTokenStore(nn.ModuleDict):
    """The modules of the model's virtual-token adapters, by adapter name.

    Layer methods never select modules inside it (``is_peftkit_wrapper``), so
    a LoRA with ``target_modules="all-linear"`` leaves a P-tuning MLP alone.
    """

    is_peftkit_wrapper = True


class VirtualTokenAdapter(Adapter):
    """One virtual-token adapter: its module in the model's store, and how a call uses it."""

    def __init__(
        self, name: str, config: PromptLearningConfig, model: nn.Module, module: VirtualTokenModule, layout: Layout
    ) -> None:
        super().__init__(name, config, [f"{STORE_NAME}.{name}"])
        self.model = model
        self.module = module
        self.layout = layout
        self.active = False

    @property
    def num_prompts(self) -> int:
        return int(getattr(self.config, "num_prompts", 1))

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.module.parameters()

    def set_active(self, active: bool) -> None:
        self.active = active

    @contextmanager
    def forward(self, inputs: dict[str, Any], rows: dict[str, torch.Tensor] | None) -> Iterator[dict[str, Any]]:
        """Hook the model for one forward or ``generate()``; the inputs pass through unchanged.

        Virtual-token methods take no mixed batches, so ``rows`` is always ``None``.
        """
        if not self.active:
            yield inputs
            return
        if self.num_prompts > 1 and _beams(inputs, self.model) > 1:
            raise VirtualTokenInputError(
                "beam search cannot reorder the cache of a prompt ensemble (num_prompts > 1); "
                "use greedy or sampled generation"
            )
        n = self.config.num_virtual_tokens
        assert n is not None
        call = VirtualTokenCall(self.model, self.layout, lambda: self.module.table()[:, :n], n, self.num_prompts)
        with call.installed():
            yield inputs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": table}``, PEFT's file layout."""
        return {SAVED_KEY: self.module.saved_embeddings().detach()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Check the file's tensors, then copy them in (nothing changes on error)."""
        unexpected = sorted(set(tensors) - {SAVED_KEY})
        if SAVED_KEY not in tensors or unexpected:
            found = ", ".join(sorted(tensors)) or "none"
            raise AdapterLoadError(
                f"a {self.config.peft_type} adapter file holds exactly '{SAVED_KEY}'; found {found}"
                + (f" (unexpected: {', '.join(unexpected)})" if unexpected else "")
            )
        expected = tuple(self.module.saved_embeddings().shape)
        given = tuple(tensors[SAVED_KEY].shape)
        if given != expected:
            raise AdapterLoadError(
                f"{SAVED_KEY} has shape {given} but this adapter needs {expected} (total virtual tokens x token_dim); "
                f"is the adapter for another base model, or were num_virtual_tokens / num_prompts changed?"
            )
        self.module.load_saved_embeddings(tensors[SAVED_KEY])

    def merge(self) -> None:
        raise MergeError(
            f"{self.config.peft_type} adds virtual tokens to the input; there is no weight to fold them into"
        )

    unmerge = merge

    def unload(self) -> None:
        """Remove this adapter's module; the store goes too when it is empty."""
        store = getattr(self.model, STORE_NAME, None)
        if isinstance(store, VirtualTokenStore) and self.name in store:
            del store[self.name]
            if not len(store):
                delattr(self.model, STORE_NAME)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's token embedding (what turns ``input_ids`` into vectors)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Embedding):
        raise InjectError(
            f"virtual tokens need a transformers model whose get_input_embeddings() is an nn.Embedding; "
            f"{type(model).__name__} has {type(embeddings).__name__}"
        )
    return embeddings


def model_layout(model: nn.Module, task_type: str | None) -> Layout:
    """How the model's outputs line up with its input: per token, per sequence, as spans, or encoder-decoder."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        if not callable(getattr(model, "get_encoder", None)):
            raise InjectError(f"{name} is an encoder-decoder model without get_encoder(); virtual tokens need it")
        return "seq2seq"
    if task_type == "SEQ_2_SEQ_LM":
        raise InjectError(f"task_type SEQ_2_SEQ_LM needs an encoder-decoder model, got {name}")
    if name.endswith("ForSequenceClassification") or task_type == "SEQ_CLS":
        return "sequence"
    if name.endswith("ForQuestionAnswering") or task_type == "QUESTION_ANS":
        return "span"
    return "tokens"


def inject_virtual_tokens(
    model: nn.Module,
    config: PromptLearningConfig,
    adapter_name: str,
    build: Callable[[nn.Embedding], VirtualTokenModule],
) -> VirtualTokenAdapter:
    """Resolve the config's sizes from the model, build the method's module and add it to the model's store."""
    embeddings = input_embeddings(model)
    layout = model_layout(model, config.task_type)
    config.resolve(getattr(model, "config", None))
    if config.token_dim != embeddings.embedding_dim:
        raise InjectError(
            f"token_dim is {config.token_dim} but the model's input embeddings have {embeddings.embedding_dim}"
        )
    module = build(embeddings)
    store = getattr(model, STORE_NAME, None)
    if store is None:
        store = VirtualTokenStore()
        model.add_module(STORE_NAME, store)
    store[adapter_name] = module
    return VirtualTokenAdapter(adapter_name, config, model, module, layout)


_GENERATE_ONLY = ("generation_config", "num_beams", "max_new_tokens", "max_length", "min_new_tokens", "do_sample")


def _beams(inputs: dict[str, Any], model: nn.Module) -> int:
    """The beam count of a ``generate()`` call (1 for a forward, whose inputs name no generation option)."""
    if not any(key in inputs for key in _GENERATE_ONLY):
        return 1
    generation_config = inputs.get("generation_config") or getattr(model, "generation_config", None)
    return int(inputs.get("num_beams") or getattr(generation_config, "num_beams", None) or 1)
