"""The shift method's torch code: the layer wrapper, the adapter handle and injection.

Imported by the hooks in ``plugin.py`` only when an adapter is first used, so
``import peftkit_template`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LayerAdapter, MergeError
from peftkit.io import PEFT_PREFIX, check_tensors
from peftkit.targeting import get_submodule_parent, select_modules
from peftkit_template.config import ShiftConfig


class ShiftLayer(nn.Module):
    """Wraps a Linear/Conv1D as ``base_layer`` and adds the active adapter's vector to its output.

    Plain torch: the forward pass reads one attribute to know the active
    adapter, and never calls back into peftkit. ``active``, ``rows``,
    ``adapter_names``, ``remove_adapter``, ``merge`` and ``unmerge`` are what
    :class:`peftkit.LayerAdapter` drives.
    """

    is_peftkit_wrapper = True  # tells peftkit.targeting not to select modules inside this one

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.shift = nn.ParameterDict()  # adapter name -> vector v; saved as "<module>.shift"
        self.active: str | None = None
        self.merged: list[str] = []  # adapters folded into base_layer.bias
        self.rows: dict[str, torch.Tensor] | None = None  # batch rows per adapter, set for one mixed call

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: some models read it from their layers (T5 checks ``wo.weight.dtype``)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.shift)

    def add(self, name: str, init_zero: bool) -> None:
        weight = self.weight
        features = weight.shape[1] if isinstance(self.base_layer, Conv1D) else weight.shape[0]  # Conv1D: (in, out)
        vector = torch.zeros(features, dtype=weight.dtype, device=weight.device)
        if not init_zero:
            vector.normal_()
        self.shift[name] = nn.Parameter(vector)

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``; the adapter unwraps the layer once none is left."""
        del self.shift[name]
        if name in self.merged:
            self.merged.remove(name)  # merge_and_unload: the bias keeps the vector
        if self.active == name:
            self.active = None

    def merge(self, name: str) -> None:
        """Fold the vector into the base layer's bias (the adapter checked that there is one)."""
        with torch.no_grad():
            self.base_layer.bias += self.shift[name]
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        with torch.no_grad():
            self.base_layer.bias -= self.shift[name]
        self.merged.remove(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:  # a mixed batch: each adapter shifts only its own rows
            for name, rows in self.rows.items():
                if name in self.shift:
                    out = out.index_add(0, rows, self.shift[name].expand_as(out[rows]))
            return out
        if self.active is None or self.active in self.merged:
            return out
        return out + self.shift[self.active]


class ShiftAdapter(LayerAdapter):
    """One shift adapter: the layers it lives in. The core hands it back to every hook.

    :class:`peftkit.LayerAdapter` switches it on and off, routes mixed batches,
    merges and unloads it through the layers; what is left is the method's own.
    """

    layers: dict[str, ShiftLayer]

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.shift[self.name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their disk keys: ``base_model.model.<module>.shift`` (no adapter name)."""
        return {f"{PEFT_PREFIX}{t}.shift": layer.shift[self.name].detach() for t, layer in self.layers.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved vectors in; check every key and shape first, so an error changes nothing."""
        check_tensors(tensors, self.state_dict(), "shift adapter", "is it for another base model?")
        with torch.no_grad():
            for target, layer in self.layers.items():
                vector = layer.shift[self.name]
                vector.copy_(tensors[f"{PEFT_PREFIX}{target}.shift"].to(vector.dtype))

    def merge(self) -> None:
        """Add each vector to its layer's bias; refuse (changing nothing) if any target has no bias."""
        no_bias = [t for t, layer in self.layers.items() if getattr(layer.base_layer, "bias", None) is None]
        if no_bias:
            raise MergeError(f"shift adapter {self.name!r} cannot merge: target modules without a bias: {no_bias}")
        super().merge()


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (ShiftLayer, nn.Linear, Conv1D))


def inject(model: nn.Module, config: ShiftConfig, adapter_name: str) -> ShiftAdapter:
    """Wrap each target layer (or reuse its wrapper) and add the adapter's vector; return the handle."""
    targets = select_modules(
        model,
        config.target_modules,
        supported=_adaptable,
        is_linear=_adaptable,
        modules_to_save=config.modules_to_save,  # the core trains those in full (e.g. a classifier head): not targets
    )
    layers = {}
    for target in targets:  # build everything first, so that an error leaves the model unchanged
        module = model.get_submodule(target)
        layer = module if isinstance(module, ShiftLayer) else ShiftLayer(module)
        layer.add(adapter_name, config.init_zero)
        layers[target] = layer
    for target, layer in layers.items():
        parent, attr = get_submodule_parent(model, target)
        setattr(parent, attr, layer)
    return ShiftAdapter(adapter_name, config, model, layers)
