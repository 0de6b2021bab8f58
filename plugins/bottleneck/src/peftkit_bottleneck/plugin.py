"""The peftkit hook implementations for bottleneck adapters (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first bottleneck adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_bottleneck.config import BottleneckConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_bottleneck.adapter import BottleneckAdapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="bottleneck",
            peft_type="BOTTLENECK",
            config_class=BottleneckConfig,
            description="Bottleneck adapters (Houlsby, Pfeiffer, parallel) after or beside attention and feed-forward",
            mergeable=False,
            mixed_batches=True,
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> BottleneckAdapter | None:
    if not isinstance(config, BottleneckConfig):
        return None
    from peftkit_bottleneck.adapter import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_forward(
    adapter: BottleneckAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, BottleneckConfig):
        return None
    return adapter.route_rows(inputs, rows)


@hookimpl
def peftkit_state_dict(
    adapter: BottleneckAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, BottleneckConfig):
        return None
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


@hookimpl
def peftkit_merge(adapter: BottleneckAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, BottleneckConfig):
        return None
    if action == "unload":
        adapter.unload()
    else:
        adapter.refuse_merge()
    return True
