"""The peftkit hook implementations for (IA)^3 (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first (IA)^3 adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_ia3.config import IA3Config

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_ia3.adapter import IA3Adapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="ia3",
            peft_type="IA3",
            config_class=IA3Config,
            description="(IA)^3: learned vectors scaling the keys, values and feed-forward inputs",
            mergeable=True,
            mixed_batches=True,
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> IA3Adapter | None:
    if not isinstance(config, IA3Config):
        return None
    from peftkit_ia3.adapter import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_forward(
    adapter: IA3Adapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, IA3Config):
        return None
    return adapter.route_rows(inputs, rows)


@hookimpl
def peftkit_state_dict(
    adapter: IA3Adapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, IA3Config):
        return None
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


@hookimpl
def peftkit_merge(adapter: IA3Adapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, IA3Config):
        return None
    {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
    return True
