"""The peftkit hook implementations for (IA)^3 (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first (IA)^3 adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_ia3.config import IA3Config

if TYPE_CHECKING:
    from collections.abc import Callable


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


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    IA3Config, "peftkit_ia3.adapter:inject"
)
