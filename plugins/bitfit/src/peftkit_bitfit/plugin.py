"""The peftkit hook implementations for BitFit (the ``peftkit`` entry point).

Importing this module does not import torch: the adapter code loads when the
first BitFit adapter is injected. BitFit rewrites no inputs, so it has no
``peftkit_forward`` implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_bitfit.config import BitFitConfig

if TYPE_CHECKING:
    from collections.abc import Callable


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


_hooks = method_hooks(BitFitConfig, "peftkit_bitfit.adapter:inject")
peftkit_inject, peftkit_state_dict, peftkit_merge = _hooks.inject, _hooks.state_dict, _hooks.merge
