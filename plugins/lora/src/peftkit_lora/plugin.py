"""The peftkit hook implementations for LoRA (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first LoRA adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_lora.config import LoraConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_lora.adapter import LoraAdapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="lora",
            peft_type="LORA",
            config_class=LoraConfig,
            description="Low-rank adaptation of Linear, Conv1D, Embedding and Conv2d layers",
            mergeable=True,
            mixed_batches=True,
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> LoraAdapter | None:
    if not isinstance(config, LoraConfig):
        return None
    from peftkit_lora.adapter import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_forward(
    adapter: LoraAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, LoraConfig):
        return None
    return adapter.route_rows(inputs, rows)


@hookimpl
def peftkit_state_dict(adapter: LoraAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    if not isinstance(config, LoraConfig):
        return None
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


@hookimpl
def peftkit_merge(adapter: LoraAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, LoraConfig):
        return None
    {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
    return True
