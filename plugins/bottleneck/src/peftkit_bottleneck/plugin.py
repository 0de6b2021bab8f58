"""The peftkit hook implementations for bottleneck adapters (the ``peftkit`` entry point).

Importing this module does not import torch: the layer code loads when the
first bottleneck adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_bottleneck.config import BottleneckConfig

if TYPE_CHECKING:
    from collections.abc import Callable


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


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    BottleneckConfig, "peftkit_bottleneck.adapter:inject"
)
