"""Adding a P-tuning v2 adapter: every layer of every stack gets its own prompts in a peftkit-prefix table.

Imported by the hooks in ``plugin.py`` only when the first adapter is injected.
"""

from __future__ import annotations

from torch import nn

from peftkit import InjectError
from peftkit_prefix.adapter import PrefixAdapter, attach
from peftkit_prefix.geometry import (
    ModelGeometry,
    PrefixLayout,
    check_shape_fields,
    fill_shape_fields,
    model_geometry,
)
from peftkit_prefix.table import PrefixTable
from peftkit_ptuning_v2.config import PTuningV2Config


def inject(model: nn.Module, config: PTuningV2Config, adapter_name: str) -> PrefixAdapter:
    """Read the shape fields from the model, lay the prompts out per layer and attach the table."""
    geometry = model_geometry(model)
    fill_shape_fields(config, geometry)
    check_shape_fields(config, geometry, "P-tuning v2")
    layout = deep_layout(config, geometry)
    zero = config.init_weights == "zero"
    table = PrefixTable(config.num_virtual_tokens, layout.width, zero_init=zero, dropout=config.prefix_dropout)
    return attach(model, adapter_name, config, table, layout)


def deep_layout(config: PTuningV2Config, geometry: ModelGeometry) -> PrefixLayout:
    """Every layer its own slot: the encoder's layers first, then the decoder's (or the only stack's)."""
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
