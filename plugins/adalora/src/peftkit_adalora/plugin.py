"""The peftkit hook implementations for AdaLoRA (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first AdaLoRA adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_adalora.adapter import AdaLoraAdapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="adalora",
            peft_type="ADALORA",
            config_class=AdaLoraConfig,
            description="LoRA in SVD form whose rank budget moves to the most important modules while training",
            mergeable=True,
            mixed_batches=True,
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> AdaLoraAdapter | None:
    if not isinstance(config, AdaLoraConfig):
        return None
    from peftkit_adalora.adapter import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_forward(
    adapter: AdaLoraAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, AdaLoraConfig):
        return None
    return adapter.route_rows(inputs, rows)


@hookimpl
def peftkit_state_dict(
    adapter: AdaLoraAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, AdaLoraConfig):
        return None
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


@hookimpl
def peftkit_merge(adapter: AdaLoraAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, AdaLoraConfig):
        return None
    {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
    return True
