"""What QLoRA changes in LoRA's layers: the delta's dtype, and merging into a quantized weight."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit_lora.kernels import lora_linear
from peftkit_lora.layers import LoraLinear, fusable_call
from peftkit_qlora.dequant import dense_row_slices
from peftkit_qlora.quantize import MERGED_MARK, QuantFormat, bnb, dequantized_weight


class QuantLoraLinear(LoraLinear):
    """LoRA over a bitsandbytes 4-bit or 8-bit layer.

    The adapter weights stay in float32 (the optimizer's master copy); the
    delta runs in the base layer's compute dtype (the input's dtype for 8-bit
    layers), so a bf16 model keeps bf16 activations. The scaling multiplies
    the rank-``r`` intermediate rather than the full-width output.
    A LoRA layer becomes one when its base is quantized (as
    ``torch.nn.utils.parametrize`` swaps a module's class), keeping every
    attribute and parameter.

    Over a 4-bit base, a call with more than one input row runs as one
    autograd function (:func:`peftkit_lora.kernels.lora_linear`) that
    dequantizes the weight in forward and again in backward, a slice of rows
    at a time (:mod:`peftkit_qlora.dequant`), keeping neither:
    the base matmul, dropout and both LoRA products in a single node, instead
    of bitsandbytes' matmul plus a handful of small autograd ops. Single-row
    calls without gradients (token-by-token decoding) keep bitsandbytes'
    own 4-bit kernel, which never builds the dense weight.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active
        if name is None or self.rows is not None or self.merged_adapters or args or kwargs or not self._quantized_fast_path_applies(x, name):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        weight_slices = functools.partial(dense_row_slices, base.weight.data, base.weight.quant_state, x.dtype)
        lora_b, scaling = self.lora_b_and_scaling(name, x.dtype)
        return lora_linear(x, None, base.bias, self.lora_A[name].weight, lora_b, scaling, p, weight_slices)

    def _quantized_fast_path_applies(self, x: torch.Tensor, name: str) -> bool:
        base = self.base_layer
        if type(base) is not bnb().nn.Linear4bit or getattr(base.weight, "quant_state", None) is None:
            return False
        if base.bias is not None and base.bias.requires_grad:
            return False
        lora_a = self.lora_A[name].weight
        decoding = x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad))
        return not decoding and x.dtype == base.compute_dtype and lora_a.dtype.is_floating_point and fusable_call(base, x)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self.base_layer, "compute_dtype", None) or x.dtype
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        hidden = F.linear(self.lora_dropout[name](x.to(dtype)), lora_a.to(dtype)) * self.scaling[name]
        return F.linear(hidden, lora_b.to(dtype))


class MergedQuantLinear(nn.Linear):
    """A dense stand-in for a quantized layer while an adapter is merged into it.

    It holds the dequantized weight, to which LoRA adds its update, in
    ``dtype``: the dtype of the model's dense weights (in the usual setup, a
    bf16 model computing in bf16, the compute dtype). The original quantized
    layer is kept aside (not registered, so it is neither saved nor trained)
    and comes back on unmerge, bit for bit.
    """

    def __init__(self, quantized: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(quantized.in_features, quantized.out_features, bias=False, device="meta")
        self.weight = nn.Parameter(dequantized_weight(quantized, dtype), requires_grad=False)
        self.bias = quantized.bias  # shared: LoRA may train it (bias="all") and merging leaves it alone
        self.__dict__["quantized"] = quantized
        self.format = QuantFormat.of(quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight, bias).to(x.dtype)

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weights, marked so that quantizing it again needs an opt-in."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(self.weight.dtype), requires_grad=self.bias.requires_grad)
        setattr(linear, MERGED_MARK, self.format)
        return linear.train(self.training)
