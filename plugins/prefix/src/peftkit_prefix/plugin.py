"""The peftkit hook implementations for prefix tuning (the ``peftkit`` entry point).

Importing this module does not import torch: the machinery loads when the
first prefix-tuning adapter is injected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import MethodSpec, PeftConfig, hookimpl
from peftkit_prefix.config import PROMPT_LEARNING_PREFIX, PrefixTuningConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_prefix.adapter import PrefixAdapter


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


def _owns(config: PeftConfig) -> bool:
    return isinstance(config, PrefixTuningConfig)


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> PrefixAdapter | None:
    if not _owns(config):
        return None
    from peftkit_prefix.adapter import inject

    return inject(model, config, adapter_name)  # type: ignore[arg-type]


@hookimpl
def peftkit_forward(
    adapter: PrefixAdapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
) -> AbstractContextManager[dict[str, Any]] | None:
    return adapter.session(inputs) if _owns(config) else None


@hookimpl
def peftkit_state_dict(
    adapter: PrefixAdapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    return adapter.state(tensors) if _owns(config) else None


@hookimpl
def peftkit_merge(adapter: PrefixAdapter, config: PeftConfig, action: str) -> bool | None:
    return adapter.merge_action(action) if _owns(config) else None
