"""The peftkit hooks for prompt tuning (the ``peftkit`` entry point).

Importing this module does not import torch: the adapter code loads when the
first prompt-tuning adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MergeError, MethodSpec, PeftConfig, hookimpl
from peftkit_prompt.config import PromptTuningConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_prompt.adapter import VirtualTokenAdapter

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


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> VirtualTokenAdapter | None:
    if not isinstance(config, PromptTuningConfig):
        return None
    from peftkit_prompt.adapter import inject_virtual_tokens
    from peftkit_prompt.embedding import PromptEmbedding

    return inject_virtual_tokens(model, config, adapter_name, lambda embeddings: PromptEmbedding(config, embeddings))


@hookimpl
def peftkit_forward(
    adapter: VirtualTokenAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    if not isinstance(config, PromptTuningConfig):
        return None
    return adapter.call(inputs)


@hookimpl
def peftkit_state_dict(
    adapter: VirtualTokenAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if not isinstance(config, PromptTuningConfig):
        return None
    return virtual_token_state(adapter, tensors)


@hookimpl
def peftkit_merge(adapter: VirtualTokenAdapter, config: PeftConfig, action: str) -> bool | None:
    if not isinstance(config, PromptTuningConfig):
        return None
    return virtual_token_merge(adapter, action)


def virtual_token_state(adapter: VirtualTokenAdapter, tensors: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The ``peftkit_state_dict`` answer of every virtual-token method."""
    if tensors is None:
        return adapter.state_dict()
    adapter.load_state_dict(tensors)
    return {}


def virtual_token_merge(adapter: VirtualTokenAdapter, action: str) -> bool:
    """The ``peftkit_merge`` answer of every virtual-token method: unload only."""
    if action != "unload":
        raise MergeError(
            f"{adapter.config.peft_type} adds virtual tokens to the input; there is no weight to fold them into"
        )
    adapter.unload()
    return True
