"""(IA)^3 layers: a wrapper per base layer type holding one scaling vector per named adapter.

The wrapper keeps the original module as ``base_layer`` and the vectors in
``ia3_l`` (a ParameterDict keyed by adapter name), so parameter names match
Hugging Face PEFT's. Vectors have PEFT's shapes: ``(out, 1)`` or ``(1, in)``
for Linear/Conv1D, ``(1, channels, 1, 1)`` for Conv2d.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import MergeError


class IA3Layer(nn.Module):
    """Base of the (IA)^3 wrappers: adapters, switching, mixed batches and exact merging."""

    is_peftkit_wrapper = True

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.active: str | None = None
        self.rows: dict[str, torch.Tensor] | None = None
        # Base weight and bias as they were before each merge, so unmerge is exact (no division).
        self._pre_merge: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias  # type: ignore[return-value]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._pre_merge)

    def add_adapter(self, name: str, feedforward: bool, init_ones: bool) -> None:
        shape = self.vector_shape(feedforward)
        vector = torch.ones(shape) if init_ones else torch.randn(shape)
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else None
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.ia3_l[name] = nn.Parameter(vector.to(device=device, dtype=dtype))
        self.is_feedforward[name] = feedforward

    def remove_adapter(self, name: str) -> None:
        del self.ia3_l[name], self.is_feedforward[name]
        self._pre_merge.pop(name, None)  # a merged adapter's weights stay as they are
        if self.active == name:
            self.active = None

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.rows is not None:
            return self._mixed_forward(x, *args, **kwargs)
        name = self.active
        if name is None or self._pre_merge:
            return self.base_layer(x, *args, **kwargs)
        vector = self.ia3_l[name]
        if self.is_feedforward[name]:
            scaled = (x.to(vector.dtype) * self.broadcast(vector)).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * self.broadcast(vector)).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row scaled by its own adapter's vector; rows of other adapters are multiplied by exactly 1."""
        assert self.rows is not None
        in_scale: torch.Tensor | None = None
        out_scale: torch.Tensor | None = None
        for name, rows in self.rows.items():
            if name not in self.ia3_l:
                continue
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                in_scale = _fill_rows(in_scale, x.shape[0], rows, vector)
            else:
                out_scale = _fill_rows(out_scale, x.shape[0], rows, vector)
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * self.broadcast_rows(in_scale, x.dim())).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is None:
            return result
        return (result * self.broadcast_rows(out_scale, result.dim())).to(result.dtype)

    # ------------------------------------------------------------------ merge
    def merge(self, name: str) -> None:
        """Fold ``name``'s vector into the base weight (and bias, when it scales the output)."""
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        self._pre_merge[name] = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        vector = self.ia3_l[name].detach()
        feedforward = self.is_feedforward[name]
        with torch.no_grad():
            weight.copy_(weight * self.weight_scale(vector, feedforward))
            if bias is not None and not feedforward:
                bias.copy_(bias * vector.flatten())

    def unmerge(self, name: str) -> None:
        """Restore the weight and bias saved at merge time, bit for bit."""
        if name not in self._pre_merge:
            return
        if list(self._pre_merge)[-1] != name:
            raise MergeError(f"adapter {name!r} was merged before {list(self._pre_merge)[-1]!r}; unmerge that first")
        weight, bias = self._pre_merge.pop(name)
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)

    # ------------------------------------------------- filled in per layer type
    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        """PEFT's shape of the ``ia3_l`` vector."""
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def broadcast(self, vector: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply activations (features in the last dimension)."""
        return vector.flatten()

    def broadcast_rows(self, scale: torch.Tensor, dim: int) -> torch.Tensor:
        """A ``(batch, features)`` scale shaped to multiply activations of ``dim`` dimensions."""
        return scale.view(scale.shape[0], *([1] * (dim - 2)), scale.shape[1])

    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        """The vector shaped to multiply the base weight (``(out, in)`` for ``nn.Linear``)."""
        return vector


class IA3Linear(IA3Layer):
    """(IA)^3 on ``nn.Linear``, and on transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``."""

    def __init__(self, base_layer: nn.Module) -> None:
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            in_features, out_features = base_layer.weight.shape
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        super().__init__(base_layer, in_features, out_features)

    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        return vector.T if self.fan_in_fan_out else vector


class IA3Conv2d(IA3Layer):
    """(IA)^3 on ``nn.Conv2d``: one factor per input channel (feed-forward) or output channel."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features if feedforward else self.out_features, 1, 1)

    def broadcast(self, vector: torch.Tensor) -> torch.Tensor:
        return vector

    def broadcast_rows(self, scale: torch.Tensor, dim: int) -> torch.Tensor:
        return scale.view(*scale.shape, *([1] * (dim - 2)))

    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        if not feedforward:
            return vector.view(-1, 1, 1, 1)
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        groups, per_group_in = base.groups, base.in_channels // base.groups
        per_group_out = base.out_channels // groups
        # Weight is (out, in / groups, kh, kw): output channel o sees inputs of its own group only.
        grouped = vector.view(groups, 1, per_group_in).expand(groups, per_group_out, per_group_in)
        return grouped.reshape(base.out_channels, per_group_in, 1, 1)


def _fill_rows(scale: torch.Tensor | None, batch: int, rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """A ``(batch, features)`` scale of ones (made on first use) with ``vector`` in the given rows."""
    if scale is None:
        scale = torch.ones(batch, vector.numel(), dtype=vector.dtype, device=vector.device)
    return scale.index_copy(0, rows, vector.expand(len(rows), -1))


def ia3_layer_for(module: nn.Module) -> type[IA3Layer] | None:
    """The (IA)^3 wrapper class for a base module, or ``None`` if (IA)^3 cannot adapt it."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return IA3Linear
    if isinstance(module, nn.Conv2d):
        return IA3Conv2d
    return None
