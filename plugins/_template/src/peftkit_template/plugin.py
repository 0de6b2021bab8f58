"""The peftkit hooks for the shift method: the module the ``peftkit`` entry point names.

Keep this module free of torch imports: ``peftkit methods`` imports every
plugin just to list it. The torch code in ``shift.py`` loads inside the hooks.

Every hook but registration is "first result": return ``None`` for a config
that is not yours, so that the core asks the next plugin.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_template.config import ShiftConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_template.shift import ShiftAdapter


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="shift",
            peft_type=ShiftConfig.peft_type,
            config_class=ShiftConfig,
            description="A learned vector added to the output of Linear/Conv1D layers",
            mergeable=True,  # into the layer's bias (layers without one refuse with MergeError)
            mixed_batches=True,  # so the core calls peftkit_forward for adapter_names=[...]
        )
    )


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> ShiftAdapter | None:
    if not isinstance(config, ShiftConfig):
        return None
    from peftkit_template.shift import inject

    return inject(model, config, adapter_name)


@hookimpl
def peftkit_forward(
    adapter: ShiftAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, ShiftConfig):
        return None
    return adapter.route_rows(inputs, rows)


@hookimpl
def peftkit_state_dict(
    adapter: ShiftAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, ShiftConfig):
        return None
    if tensors is None:  # saving: hand the core the tensors under their disk keys
        return adapter.state_dict()
    adapter.load_state_dict(tensors)  # loading: raises AdapterLoadError if they do not fit
    return {}


@hookimpl
def peftkit_merge(adapter: ShiftAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, ShiftConfig):
        return None
    {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
    return True
