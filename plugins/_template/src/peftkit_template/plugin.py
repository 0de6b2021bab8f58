"""The peftkit hooks for the shift method: the module the ``peftkit`` entry point names.

Keep this module free of torch imports: ``peftkit methods`` imports every
plugin just to list it. The torch code in ``shift.py`` loads inside the hooks.

Every hook but registration is "first result": it returns ``None`` for a
config that is not yours, so that the core asks the next plugin.
:func:`peftkit.method_hooks` writes those four hooks: each answers only for
``ShiftConfig``, the first ``peftkit_inject`` imports ``shift.py`` and calls
its ``inject``, the others call the ``ShiftAdapter`` it returned. pluggy finds
them by the module-level names they are assigned to. A method whose hooks do
more writes those hooks out as ``@hookimpl`` functions (docs/hooks.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_template.config import ShiftConfig

if TYPE_CHECKING:
    from collections.abc import Callable


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


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    ShiftConfig, "peftkit_template.shift:inject"
)
