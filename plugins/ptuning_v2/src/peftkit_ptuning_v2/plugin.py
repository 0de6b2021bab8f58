"""The peftkit hook implementations for P-tuning v2 (the ``peftkit`` entry point).

The adapter, caches and per-call hooks are peftkit-prefix's; ``adapter.py``
only lays the prompts out (every layer of every stack gets its own) and builds
the table. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_prefix.config import PROMPT_LEARNING_PREFIX
from peftkit_ptuning_v2.config import PTuningV2Config

if TYPE_CHECKING:
    from collections.abc import Callable


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="p_tuning_v2",
            peft_type="P_TUNING_V2",
            config_class=PTuningV2Config,
            description="Deep prompts: trainable key/value prefixes at every layer of every stack, no reparameterisation",
            rewrites_inputs=True,
            noop_at_init=False,
            model_kinds=("causal-lm", "seq2seq-lm", "seq-cls", "token-cls"),
            modules_to_save_prefix=PROMPT_LEARNING_PREFIX,
        )
    )


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    PTuningV2Config, "peftkit_ptuning_v2.adapter:inject"
)
