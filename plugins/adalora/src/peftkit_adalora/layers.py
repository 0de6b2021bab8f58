"""AdaLoRA layers: LoRA layers (peftkit_lora) whose update is in SVD form, ``P Λ Q``.

``lora_A`` holds ``Q`` (rank x in), ``lora_E`` the singular values ``Λ``
(rank x 1) and ``lora_B`` holds ``P`` (out x rank), as plain parameters under
Hugging Face PEFT's names. A pruned singular value is a zero in ``lora_E``.
Forward, mixed batches, merging and removal come from :class:`LoraLayer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import InjectError
from peftkit_lora.layers import LoraLayer


class SVDLayer(LoraLayer):
    """Base of the AdaLoRA wrappers: one ``(P, Λ, Q)`` triplet set per adapter name."""

    adapter_attrs = ("lora_A", "lora_B", "lora_E")
    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()

    def add_adapter(self, name: str, *args: object, **kwargs: object) -> None:
        raise InjectError(
            f"this {type(self.base_layer).__name__} already holds AdaLoRA adapters; LoRA and AdaLoRA adapters "
            f"cannot share a layer, so exclude it from one of the configs"
        )

    def add_svd_adapter(self, name: str, rank: int, scaling: float, dropout: float, init: bool) -> None:
        """Add adapter ``name`` with ``rank`` triplets; ``scaling`` is ``lora_alpha / init_r`` (see the config)."""
        LoraLayer.add_adapter(self, name, rank, scaling, dropout, init)

    def _in_width(self) -> int:
        """Columns of ``Q``: the input features, times the kernel area for a convolution."""
        raise NotImplementedError

    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Parameter(torch.empty(r, self._in_width()))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1))
        self.lora_B[name] = nn.Parameter(torch.empty(self._out_features(), r))

    def _out_features(self) -> int:
        raise NotImplementedError

    def _reset(self, name: str, init: bool | str) -> None:
        """PEFT's init: ``Λ = 0`` and ``P``, ``Q`` ~ N(0, 0.02), or all N(0, 1) when ``init`` is False."""
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        with torch.no_grad():
            if init:
                nn.init.zeros_(e)
                nn.init.normal_(a, mean=0.0, std=0.02)
                nn.init.normal_(b, mean=0.0, std=0.02)
            else:
                for param in (a, e, b):
                    nn.init.normal_(param)

    def svd_product(self, name: str) -> torch.Tensor:
        """``P Λ Q * scaling``, shaped (out, in [* kernel area])."""
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.scaling[name]


class SVDLinear(SVDLayer):
    """AdaLoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _in_width(self) -> int:
        return self.in_features

    def _out_features(self) -> int:
        return self.out_features

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        return (x @ (a * e).T @ b.T) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.svd_product(name)
        return delta.T if self.fan_in_fan_out else delta


class SVDConv2d(SVDLayer):
    """AdaLoRA on ``nn.Conv2d`` (groups 1): ``P Λ Q`` reshaped to the kernel's shape."""

    def _in_width(self) -> int:
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1]

    def _out_features(self) -> int:
        return self.base_layer.out_channels  # type: ignore[return-value]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        x = self.lora_dropout[name](x.to(self.lora_A[name].dtype))
        return F.conv2d(x, self.delta_weight(name), stride=base.stride, padding=base.padding, dilation=base.dilation)  # type: ignore[arg-type]

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.svd_product(name).reshape(self.base_layer.weight.shape)


def svd_layer_for(module: nn.Module) -> type[SVDLayer] | None:
    """The AdaLoRA wrapper class for a base module, or ``None`` if AdaLoRA cannot adapt it."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return SVDLinear
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return SVDConv2d
    return None
