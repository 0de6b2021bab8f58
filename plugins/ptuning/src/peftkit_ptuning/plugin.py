"""The peftkit hooks for P-tuning (the ``peftkit`` entry point).

Importing this module does not import torch. Everything but the prompt
encoder (the hooks on the model, saving, loading, unloading) is
peftkit-prompt's virtual-token machinery.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_prompt.plugin import VIRTUAL_TOKEN_CAPABILITIES, virtual_token_merge, virtual_token_state
from peftkit_ptuning.config import PromptEncoderConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_prompt.adapter import VirtualTokenAdapter


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


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> VirtualTokenAdapter | None:
    if not isinstance(config, PromptEncoderConfig):
        return None
    from peftkit_prompt.adapter import inject_virtual_tokens
    from peftkit_ptuning.encoder import PromptEncoder

    return inject_virtual_tokens(model, config, adapter_name, lambda embeddings: PromptEncoder(config, embeddings))


@hookimpl
def peftkit_forward(
    adapter: VirtualTokenAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, PromptEncoderConfig):
        return None
    return adapter.call(inputs)


@hookimpl
def peftkit_state_dict(
    adapter: VirtualTokenAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, PromptEncoderConfig):
        return None
    return virtual_token_state(adapter, tensors)


@hookimpl
def peftkit_merge(adapter: VirtualTokenAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, PromptEncoderConfig):
        return None
    return virtual_token_merge(adapter, action)
