"""LoRA layers: one small module per base layer type, holding any number of named adapters.

Each wraps the original module as ``base_layer`` (so parameter names match
Hugging Face PEFT's) and keeps the adapter in effect in ``active``; the
forward pass does no lookup beyond that one attribute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from transformers.pytorch_utils import Conv1D

from peftkit.model import BASE
from peftkit_lora.kernels import lora_linear

T = TypeVar("T")


class MixedRows:
    """Which adapter each row of a mixed batch uses, prepared once per call for every layer."""

    _last: tuple[dict[str, torch.Tensor], MixedRows] | None = None

    @classmethod
    def for_rows(cls, rows: dict[str, torch.Tensor]) -> MixedRows:
        """The grouping of ``rows``, built once however many adapters of the call ask (the dict is the call's own)."""
        last = cls._last
        if last is None or last[0] is not rows:  # the held reference keeps the dict's identity from being reused
            last = cls._last = (rows, cls(rows))
        return last[1]

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.groups = {name: ids for name, ids in rows.items() if name != BASE}
        self.names = tuple(self.groups)
        batch_size = sum(len(ids) for ids in rows.values())
        index = torch.zeros(batch_size, dtype=torch.long, device=next(iter(rows.values())).device)
        for position, row_ids in enumerate(self.groups.values(), start=1):
            index[row_ids] = position
        self.index = index  # 0: no adapter; k: names[k - 1]
        self._masks: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def column_mask(self, ranks: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, sum of ranks): 1 where a column belongs to the row's own adapter (``ranks`` follows ``names``)."""
        key = (ranks, dtype)
        if key not in self._masks:
            # built on the CPU: repeat_interleave on a GPU would wait for the GPU to learn its output size
            owner = torch.repeat_interleave(torch.arange(1, len(ranks) + 1), torch.tensor(ranks)).to(self.index.device)
            self._masks[key] = (owner == self.index[:, None]).to(dtype).unsqueeze(1)
        return self._masks[key]


class LoraLayer(nn.Module):
    """Base of the LoRA wrappers: bookkeeping shared by every layer type."""

    is_peftkit_wrapper = True
    adapter_attrs: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active: str | None = None
        self.merged_adapters: list[str] = []
        self.rows: MixedRows | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str) -> None:
        self.r[name], self.scaling[name] = r, scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self._reset(name, init)
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else None
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            item = holder[name]
            if isinstance(item, nn.Parameter):
                holder[name] = nn.Parameter(item.detach().to(device=device, dtype=dtype))
            else:
                item.to(device=device, dtype=dtype)

    def remove_adapter(self, name: str) -> None:
        for attr in (*self.adapter_attrs, "lora_dropout"):
            del getattr(self, attr)[name]
        del self.r[name], self.scaling[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:
            return self._mixed_forward(x, result)
        name = self.active
        if name is None or self.merged_adapters:
            return result
        return result + self.delta(name, x).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row gets its own adapter's contribution (one pass per adapter in the batch)."""
        assert self.rows is not None
        for name, rows in self.rows.groups.items():
            if name in self.scaling:
                result = result.index_add(0, rows, self.delta(name, x[rows]).to(result.dtype))
        return result

    def merge(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data += self.delta_weight(name).to(weight.dtype)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data -= self.delta_weight(name).to(weight.dtype)
        self.merged_adapters.remove(name)

    # Each layer type fills these in.
    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _reset(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to the output for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update in the base weight's own layout."""
        raise NotImplementedError


def _init_pair(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is not False:
        nn.init.zeros_(b)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active
        if self.rows is not None and not (args or kwargs or self.merged_adapters or torch.is_grad_enabled()):
            fused = self._mixed_inference(x, self.rows)
            if fused is not None:
                return fused
        if name is None or self.rows is not None or self.merged_adapters or args or kwargs:
            return super().forward(x, *args, **kwargs)
        operands = self._fast_path_operands(x, name)
        if operands is None:
            return super().forward(x, *args, **kwargs)
        weight, bias, lora_a = operands
        dropout = self._modules["lora_dropout"]._modules[name]  # type: ignore[union-attr]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        return lora_linear(
            x, weight.T if self.fan_in_fan_out else weight, bias, lora_a, *self.lora_b_and_scaling(name, x.dtype), p
        )

    def lora_b_and_scaling(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """``(B, scaling)`` for the fused kernel; without gradients, ``(scaling * B in dtype, 1.0)``, cached until B changes.

        The cache spares inference one small kernel per layer and call.
        """
        lora_b = self._modules["lora_B"]._modules[name]._parameters["weight"]  # type: ignore[union-attr]
        assert lora_b is not None
        scaling = self.scaling[name]
        if torch.is_grad_enabled():
            return lora_b, scaling
        key = (name, scaling, dtype, _versions(lora_b))
        return self._reused("_scaled_b_cache", key, lambda: (lora_b * scaling).to(dtype), lora_b.is_cuda), 1.0

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """All rows at once: one matmul through every adapter's ``A``, zero the columns of other rows' adapters, one through the ``B``s.

        The concatenated ``A`` (every adapter's rank side by side) reads the
        input once, as a single adapter would; the extra FLOPs of the unused
        columns are few, as ranks are small.
        """
        rows = self.rows
        assert rows is not None
        if x.shape[0] != rows.index.shape[0]:
            raise ValueError(f"mixed batch: layer input has {x.shape[0]} rows, adapter_names {rows.index.shape[0]}")
        if self._mixed_dropout(rows):
            return super()._mixed_forward(x, result)  # per-adapter dropout: one pass per adapter
        lora_a, lora_b, ranks = self._concatenated(rows.names)
        if lora_a is None or lora_b is None:
            return result  # none of the batch's adapters is on this layer
        flat_h = _own_columns(x.to(lora_a.dtype).reshape(-1, x.shape[-1]), x.shape[0], lora_a, rows, ranks)
        flat_out = result.reshape(-1, result.shape[-1])
        if result.dtype != flat_h.dtype:
            return result + (flat_h @ lora_b.T).view(result.shape).to(result.dtype)
        if torch.is_grad_enabled():
            return torch.addmm(flat_out, flat_h, lora_b.T).view(result.shape)
        return flat_out.addmm_(flat_h, lora_b.T).view(result.shape)

    def _mixed_inference(self, x: torch.Tensor, rows: MixedRows) -> torch.Tensor | None:
        """A mixed batch without gradients in three products: ``(x A^T * mask) B^T``, then the base matmul added onto it.

        As the single-adapter fast path, it skips the base module's call and
        output buffer; ``None`` where the plain base module must run.
        """
        base = self._modules["base_layer"]
        assert base is not None
        if type(base) not in (nn.Linear, Conv1D) or x.shape[0] != rows.index.shape[0] or not fusable_call(base, x):
            return None
        if self.training and self._mixed_dropout(rows):
            return None  # dropout applies in training mode, gradients or not: the per-adapter path
        lora_a, lora_b, ranks = self._concatenated(rows.names)
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        if lora_a is None or lora_b is None or weight is None or not (x.dtype == weight.dtype == lora_a.dtype):
            return None
        flat_x = x.reshape(-1, x.shape[-1])
        flat_h = _own_columns(flat_x, x.shape[0], lora_a, rows, ranks)
        out = flat_h @ lora_b.T if bias is None else torch.addmm(bias, flat_h, lora_b.T)
        out.addmm_(flat_x, weight if self.fan_in_fan_out else weight.T)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mixed_dropout(self, rows: MixedRows) -> bool:
        """Whether dropout applies to one of the batch's adapters on this layer (training mode)."""
        return self.training and any(isinstance(self.lora_dropout[n], nn.Dropout) for n in rows.names if n in self.scaling)

    def _concatenated(self, names: tuple[str, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, ...]]:
        """The adapters' ``A`` stacked by rows and scaled ``B`` by columns, with each one's rank (0: not here).

        Without gradients the result is cached until a weight or scale changes;
        with them it is built anew each call, so that gradients reach each adapter.
        """
        scaling = self.scaling
        present = [n for n in names if n in scaling]
        ranks = tuple([self.r.get(n, 0) for n in names])
        if not present:
            return None, None, ranks
        # straight from the modules' dicts: nn.Module.__getattr__ would cost microseconds per lookup, per layer and call
        a_modules, b_modules = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules  # type: ignore[union-attr]
        a_weights = [a_modules[n]._parameters["weight"] for n in present]  # type: ignore[union-attr]
        b_weights = [b_modules[n]._parameters["weight"] for n in present]  # type: ignore[union-attr]

        def build() -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
            lora_b = torch.cat([b * scaling[n] for n, b in zip(present, b_weights)], dim=1)  # type: ignore[misc,operator]
            return torch.cat(a_weights), lora_b, ranks  # type: ignore[arg-type]

        if torch.is_grad_enabled() and any(w.requires_grad for w in (*a_weights, *b_weights)):  # type: ignore[union-attr]
            return build()
        key = (names, [scaling[n] for n in present], _versions(*a_weights, *b_weights))  # type: ignore[arg-type]
        return self._reused("_concat_cache", key, build, a_weights[0].is_cuda)  # type: ignore[union-attr]

    def _reused(self, slot: str, key: object, build: Callable[[], T], cuda: bool) -> T:
        """``build()`` (run without autograd), kept in ``slot`` and reused while ``key`` stays the same.

        Built anew and not kept while a CUDA graph is captured (``cuda``: the
        tensors are on a GPU): a replay skips this host-side check of ``key``,
        so it would keep reading a kept result after an in-place weight
        update; built inside the capture, every replay builds it again.
        """
        if cuda and torch.cuda.is_current_stream_capturing():
            with torch.no_grad():
                return build()
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__[slot] = (key, build())
        return cached[1]

    def _fast_path_operands(
        self, x: torch.Tensor, name: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """``(base weight, base bias, lora_A weight)`` where the fused kernel computes exactly what the module composition would, else ``None``.

        It does not for quantized or subclassed base layers, a trainable base
        weight or bias, mixed dtypes, or where :func:`fusable_call` says no.
        They are read straight from the modules' dicts: ``nn.Module.__getattr__``
        costs about a microsecond per lookup, per layer and call.
        """
        base = self._modules["base_layer"]
        if type(base) not in (nn.Linear, Conv1D):
            return None
        assert base is not None
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        lora_a = self._modules["lora_A"]._modules[name]._parameters["weight"]  # type: ignore[union-attr]
        if weight is None or lora_a is None or weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if not (x.dtype == weight.dtype == lora_a.dtype and fusable_call(base, x)):
            return None
        return weight, bias, lora_a

    def _reset(self, name: str, init: bool | str) -> None:
        _init_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: a low-rank table ``A`` (r x vocab) mapped up by ``B``."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str) -> None:
        super().add_adapter(name, r, scaling, 0.0, init)  # PEFT applies no dropout to embeddings

    def _create(self, name: str, r: int) -> None:
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, vocab))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))

    def _reset(self, name: str, init: bool | str) -> None:
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        table = self.lora_embedding_A[name].T
        hidden = F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return hidden @ self.lora_embedding_B[name].T * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: ``A`` is a conv with the base kernel to ``r`` channels, ``B`` a 1x1 conv."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int) -> None:
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)  # type: ignore[arg-type]
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False)

    def _reset(self, name: str, init: bool | str) -> None:
        _init_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        combined = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        return combined * self.scaling[name]


def _own_columns(flat_x: torch.Tensor, batch: int, lora_a: torch.Tensor, rows: MixedRows, ranks: tuple[int, ...]) -> torch.Tensor:
    """``flat_x`` (a batch's rows of tokens) through every adapter's ``A`` at once, each row keeping only its own adapter's columns."""
    h = flat_x @ lora_a.T  # (batch x tokens, sum of ranks)
    h.view(batch, -1, h.shape[-1]).mul_(rows.column_mask(ranks, h.dtype))
    return h


def _versions(*tensors: torch.Tensor) -> list[tuple[int, int]]:
    """What changes when a tensor is written in place or replaced: its version counter and its storage address."""
    return [(t._version, t.data_ptr()) for t in tensors]


def fusable_call(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether a fused kernel may stand in for calling ``base``: nothing must expect to see ``base`` run.

    No forward hooks on it or global ones, no accelerate hook (which may move
    offloaded weights in), no autocast, not inside ``torch.compile`` (which
    fuses the plain path itself), and a floating-point input.
    """
    if torch.compiler.is_compiling() or not x.dtype.is_floating_point or torch.is_autocast_enabled(x.device.type):
        return False
    if base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in base.__dict__:  # accelerate sets it as a plain attribute
        return False
    return not (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def lora_layer_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper class for a base module, or ``None`` if LoRA cannot adapt it."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return LoraConv2d
    return None
