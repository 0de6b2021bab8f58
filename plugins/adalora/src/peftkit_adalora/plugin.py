"""The peftkit hook implementations for AdaLoRA (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first AdaLoRA adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    from collections.abc import Callable


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


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    AdaLoraConfig, "peftkit_adalora.adapter:inject"
)
