"""The peftkit hooks of QLoRA (the ``peftkit`` entry point): wrappers around LoRA's own.

QLoRA answers no hook itself. Its ``wrapper=True`` implementations run around
whichever plugin answers (LoRA) for every LoRA config, plain or
:class:`QLoraConfig`: before LoRA injects they quantize the base (when the
config asks), after it they fit LoRA's layers to the quantized ones; around
LoRA's merge they swap quantized weights for dense ones, so that LoRA's
``weight += delta`` is right. Configs of other methods pass straight through.

It registers no method of its own: a :class:`QLoraConfig` is a ``LoraConfig``,
so the core finds LoRA's spec through its class, and the adapters it saves are
LoRA's (``peft_type`` "LORA", which only one plugin may claim).

Importing this module does not import torch or bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from peftkit import PeftConfig, hookimpl
from peftkit_lora import LoraConfig
from peftkit_qlora.config import QLoraConfig

if TYPE_CHECKING:
    from torch import nn

    from peftkit import Adapter


@hookimpl(wrapper=True)
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> Generator[None, Any, Any]:
    if not isinstance(config, LoraConfig):
        return (yield)
    from peftkit_qlora.adapt import fit_lora_layers, quantize_for

    originals = quantize_for(model, config) if isinstance(config, QLoraConfig) and config.quantize else {}
    try:
        adapter = yield
    except BaseException:
        from peftkit_qlora.quantize import restore

        restore(model, originals)  # a failed add leaves the model as it was
        raise
    if adapter is not None:
        fit_lora_layers(adapter)
    return adapter


@hookimpl(wrapper=True)
def peftkit_merge(adapter: Adapter, config: PeftConfig, action: str) -> Generator[None, Any, Any]:
    if not isinstance(config, LoraConfig) or not _may_hold_quantized_layers():
        return (yield)
    from peftkit_qlora.adapt import merge_around

    return (yield from merge_around(adapter, action))


def _may_hold_quantized_layers() -> bool:
    import sys

    return "bitsandbytes" in sys.modules
