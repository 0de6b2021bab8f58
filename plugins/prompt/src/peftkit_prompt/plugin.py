"""The peftkit hooks for prompt tuning (the ``peftkit`` entry point).

Importing this module does not import torch: the adapter code loads when the
first prompt-tuning adapter is injected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_prompt.config import PromptTuningConfig

if TYPE_CHECKING:
    from collections.abc import Callable

# What every virtual-token method declares: it rewrites inputs, cannot merge, is not a no-op at init, and
# (as in PEFT's prompt-learning models) saves classifier heads as "base_model.classifier.weight".
VIRTUAL_TOKEN_CAPABILITIES: dict[str, Any] = {
    "mergeable": False,
    "mixed_batches": False,
    "rewrites_inputs": True,
    "noop_at_init": False,
    "model_kinds": ("causal-lm", "seq2seq-lm", "seq-cls", "token-cls"),
    "modules_to_save_prefix": "base_model.",
}


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="prompt_tuning",
            peft_type=PromptTuningConfig.peft_type,
            config_class=PromptTuningConfig,
            description="Trained virtual-token embeddings prepended to the input (optionally an ensemble of prompts)",
            **VIRTUAL_TOKEN_CAPABILITIES,
        )
    )


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    PromptTuningConfig, "peftkit_prompt.embedding:inject"
)
