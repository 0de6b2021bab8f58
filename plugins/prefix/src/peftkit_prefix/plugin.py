"""The peftkit hook implementations for prefix tuning (the ``peftkit`` entry point).

Importing this module does not import torch: the machinery loads when the
first prefix-tuning adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_prefix.config import PROMPT_LEARNING_PREFIX, PrefixTuningConfig

if TYPE_CHECKING:
    from collections.abc import Callable


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="prefix_tuning",
            peft_type="PREFIX_TUNING",
            config_class=PrefixTuningConfig,
            description="Trainable key/value prefixes in every attention layer (optional reparameterisation MLP)",
            rewrites_inputs=True,
            noop_at_init=False,
            model_kinds=("causal-lm", "seq2seq-lm", "seq-cls", "token-cls"),
            modules_to_save_prefix=PROMPT_LEARNING_PREFIX,
        )
    )


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    PrefixTuningConfig, "peftkit_prefix.adapter:inject"
)
