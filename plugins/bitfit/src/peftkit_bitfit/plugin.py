"""The peftkit hook implementations for BitFit (the ``peftkit`` entry point).

Importing this module does not import torch: the adapter code loads when the
first BitFit adapter is injected. BitFit rewrites no inputs, so it has no
``peftkit_forward`` implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_bitfit.config import BitFitConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_bitfit.adapter import BitFitAdapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="bitfit",
            peft_type="BITFIT",
            config_class=BitFitConfig,
            description="BitFit: trains only bias terms (optionally adding zero biases where a model has none)",
            mergeable=True,
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> BitFitAdapter | None:
    if not isinstance(config, BitFitConfig):
        return None
    from peftkit_bitfit.adapter import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_state_dict(
    adapter: BitFitAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, BitFitConfig):
        return None
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


@hookimpl
def peftkit_merge(adapter: BitFitAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, BitFitConfig):
        return None
    {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
    return True
