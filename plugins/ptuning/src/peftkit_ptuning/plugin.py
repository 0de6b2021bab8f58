"""The peftkit hooks for P-tuning (the ``peftkit`` entry point).

Importing this module does not import torch. Everything but the prompt
encoder (the hooks on the model, saving, loading, unloading) is
peftkit-prompt's virtual-token machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import MethodSpec, hookimpl, method_hooks
from peftkit_prompt.plugin import VIRTUAL_TOKEN_CAPABILITIES
from peftkit_ptuning.config import PromptEncoderConfig

if TYPE_CHECKING:
    from collections.abc import Callable


@hookimpl
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="p_tuning",
            peft_type=PromptEncoderConfig.peft_type,
            config_class=PromptEncoderConfig,
            description="Virtual tokens made by a trained prompt encoder (MLP or LSTM), prepended to the input",
            **VIRTUAL_TOKEN_CAPABILITIES,
        )
    )


peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
    PromptEncoderConfig, "peftkit_ptuning.encoder:inject"
)
