"""The peftkit hook implementations for LoRA (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first LoRA adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_lora.config import LoraConfig

if TYPE_CHECKING:
    from collections.abc import Callable


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


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    LoraConfig, "peftkit_lora.adapter:inject"
)
