"""The peftkit hook implementations for P-tuning v2 (the ``peftkit`` entry point).

The adapter, caches and per-call hooks are peftkit-prefix's; this module only
lays the prompts out (every layer of every stack gets its own) and builds the
table. Importing it does not import torch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from peftkit import InjectError, MethodSpec, PeftConfig, hookimpl
from peftkit_prefix.config import PROMPT_LEARNING_PREFIX
from peftkit_ptuning_v2.config import PTuningV2Config

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from peftkit_prefix.adapter import PrefixAdapter
    from peftkit_prefix.geometry import ModelGeometry, PrefixLayout


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


def _owns(config: PeftConfig) -> bool:
    return isinstance(config, PTuningV2Config)


@hookimpl
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> PrefixAdapter | None:
    if not _owns(config):
        return None
    from peftkit_prefix.adapter import attach
    from peftkit_prefix.geometry import check_shape_fields, fill_shape_fields, model_geometry
    from peftkit_prefix.table import PrefixTable

    assert isinstance(config, PTuningV2Config)
    geometry = model_geometry(model)
    fill_shape_fields(config, geometry)
    check_shape_fields(config, geometry, "P-tuning v2")
    layout = deep_layout(config, geometry)
    zero = config.init_weights == "zero"
    table = PrefixTable(config.num_virtual_tokens, layout.width, zero_init=zero, dropout=config.prefix_dropout)
    return attach(model, adapter_name, config, table, layout)


def deep_layout(config: PTuningV2Config, geometry: ModelGeometry) -> PrefixLayout:
    """Every layer its own slot: the encoder's layers first, then the decoder's (or the only stack's)."""
    from peftkit_prefix.geometry import PrefixLayout

    layers = config.num_layers
    stacks = {"decoder": geometry.decoder_layers, "encoder": geometry.encoder_layers or layers}
    wrong = {name: count for name, count in stacks.items() if count != layers}
    if wrong:
        raise InjectError(f"P-tuning v2: num_layers={layers}, but the model's layers per stack are {wrong}")
    if not geometry.is_encoder_decoder:
        return PrefixLayout(
            config.num_virtual_tokens, geometry.num_kv_heads, geometry.head_dim, layers, tuple(range(layers))
        )
    return PrefixLayout(
        config.num_virtual_tokens,
        geometry.num_kv_heads,
        geometry.head_dim,
        slots=2 * layers,
        decoder_slots=tuple(range(layers, 2 * layers)),
        encoder_slots=tuple(range(layers)),
    )


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
