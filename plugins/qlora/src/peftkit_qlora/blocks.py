"""Per-block speed and memory options for training: compiled blocks, checkpoint inputs kept in host memory.

A 4-bit training step at a batch of one sequence runs thousands of small
kernels, and on a GPU it is bound by the host's time to launch them, not by
the GPU. :func:`compile_blocks` compiles each transformer block's parts
(attention, MLP, norms) with ``torch.compile``: the elementwise work fuses and
the launches go through inductor's lean generated code. The blocks share
their code, so one compilation serves them all.

With gradient checkpointing, every block's input stays on the GPU from its
forward until its backward: ``layers x tokens x hidden`` values, the largest
live tensors at the start of the backward pass. :class:`HostOffloadedCheckpoint`
copies each block's input to pinned host memory once the forward has used it
(asynchronously, on the compute stream) and brings it back for the
recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from peftkit import PeftkitError


def checkpointed_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """transformers' checkpointable blocks (its ``GradientCheckpointingLayer`` decoder/encoder layers) of ``model``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))


def compile_blocks(model: nn.Module, **compile_options: Any) -> nn.Module:
    """Compile the parts (direct children) of each checkpointable block with ``torch.compile``; returns ``model``.

    The block itself stays uncompiled, so gradient checkpointing wraps compiled
    code rather than being traced. peftkit's fused LoRA kernels step aside
    inside compiled code (the compiler fuses the plain path instead).
    """
    for block in require_blocks(model):
        for part in block.children():
            part.compile(**compile_options)
    return model


def require_blocks(model: nn.Module) -> list[nn.Module]:
    """:func:`checkpointed_blocks` as a list, or a clear error where there are none."""
    found = list(checkpointed_blocks(model))
    if not found:
        raise PeftkitError(
            f"compile_blocks found no checkpointable blocks (transformers' GradientCheckpointingLayer) in "
            f"{type(model).__name__}: compile the model or its modules yourself with torch.compile"
        )
    return found


class HostOffloadedCheckpoint:
    """A block's checkpoint function that keeps the block's input in pinned host memory until the backward pass.

    Wraps the function transformers calls as ``checkpoint(block_call,
    hidden_states)``; needs non-reentrant checkpointing, whose recomputation
    calls ``block_call`` again with the same arguments. (On the CPU the "host
    copy" is a plain second copy: useless but harmless, which lets tests run
    the mechanism anywhere.)
    """

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor):
            return self.checkpoint(function, *args, **kwargs)
        hidden = _HostCopy(args[0])

        def block_call(held: _HostCopy, device_marker: torch.Tensor, *rest: Any, **options: Any) -> Any:
            return function(held.tensor(), *rest, **options)

        # the empty tensor on the device tells checkpoint to stash and restore that device's RNG state
        marker = torch.empty(0, device=args[0].device)
        output = self.checkpoint(block_call, hidden, marker, *args[1:], **kwargs)
        hidden.offload()
        return output


class _HostCopy:
    """The block input: the device tensor for the forward, then a pinned host copy brought back on demand."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device_tensor: torch.Tensor | None = tensor
        self.host: torch.Tensor | None = None
        self.requires_grad = tensor.requires_grad
        self.device = tensor.device

    def offload(self) -> None:
        assert self.device_tensor is not None
        pinned = self.device.type != "cpu"
        self.host = torch.empty(self.device_tensor.shape, dtype=self.device_tensor.dtype, pin_memory=pinned)
        # on the compute stream, so ordered before any reuse of the device memory
        self.host.copy_(self.device_tensor.detach(), non_blocking=True)
        self.device_tensor = None

    def tensor(self) -> torch.Tensor:
        if self.device_tensor is not None:
            return self.device_tensor
        assert self.host is not None
        return self.host.to(self.device, non_blocking=True).requires_grad_(self.requires_grad)
