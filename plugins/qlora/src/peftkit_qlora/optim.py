"""An optimizer stepped during backward, so that the adapter's gradients never all exist at once.

With a 4-bit base, LoRA's float32 weights, their two AdamW moments and their
gradients are a large part of what a step keeps on the GPU besides the base
weights (about 0.6 GiB for r=16 on all linear layers of a 7B model, a
quarter of it gradients). The gradients are only needed until the optimizer
has used them: here the parameters are split into buckets of consecutive
parameters, each with its own optimizer, and a bucket is stepped, and its
gradients freed, as soon as backward has finished all of its gradients.
Since backward finishes a model's layers from the last to the first, at most
a bucket or two of gradients exist at any time.

The update is the one a single optimizer over all parameters would make
(optimizers such as AdamW update each parameter on its own). What it rules
out: gradient accumulation over several backward passes, and clipping by the
global gradient norm (each bucket steps before the norm is known).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from peftkit import PeftkitError


class OptimizerInBackward:
    """Step ``optimizer_class`` bucket by bucket inside ``loss.backward()``; ``step()``/``zero_grad()`` do nothing.

    ``OptimizerInBackward(params, torch.optim.AdamW, lr=2e-4, fused=True)``:
    then each ``loss.backward()`` also updates the parameters. ``bucket_size``
    parameters share one optimizer (fewer, larger buckets: less Python per
    step, more gradients alive at once). ``set_lr`` changes every bucket's
    learning rate, for schedules. The hooks stay on the parameters until
    :meth:`remove`, even if this object is dropped.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        bucket_size: int = 16,
        **options: Any,
    ) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise PeftkitError("OptimizerInBackward got no parameters that require gradients")
        if bucket_size < 1:
            raise PeftkitError(f"bucket_size must be at least 1, got {bucket_size}")
        buckets = [params[i : i + bucket_size] for i in range(0, len(params), bucket_size)]
        self.optimizers = [optimizer_class(bucket, **options) for bucket in buckets]
        self._bucket_of = {id(p): index for index, bucket in enumerate(buckets) for p in bucket}
        self._sizes = [len(bucket) for bucket in buckets]
        self._done = [0] * len(buckets)
        self._handles = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in params]

    def _gradient_ready(self, param: torch.Tensor) -> None:
        index = self._bucket_of[id(param)]
        self._done[index] += 1
        if self._done[index] == self._sizes[index]:
            self._done[index] = 0
            self.optimizers[index].step()
            self.optimizers[index].zero_grad(set_to_none=True)

    def step(self) -> None:
        """Nothing to do: backward has stepped every bucket (kept so training loops need no change)."""
        if any(self._done):
            raise PeftkitError(
                "OptimizerInBackward: some parameters got no gradient in the last backward (unused parameters, or "
                "gradients accumulated over several backward passes, which stepping in backward cannot do)"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each bucket's gradients are freed when it steps."""

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every bucket."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Every bucket's optimizer state, for checkpoints."""
        return {"buckets": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, for the same parameters and bucket size."""
        if len(state.get("buckets", ())) != len(self.optimizers):
            raise PeftkitError(
                f"optimizer state has {len(state.get('buckets', ()))} buckets, this optimizer {len(self.optimizers)}:"
                " build it over the same parameters with the same bucket_size"
            )
        for optimizer, bucket_state in zip(self.optimizers, state["buckets"]):
            optimizer.load_state_dict(bucket_state)

    def remove(self) -> None:
        """Stop stepping in backward (removes the gradient hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
