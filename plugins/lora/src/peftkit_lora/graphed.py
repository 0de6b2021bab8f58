"""A whole training step (forward, backward, optimizer step) captured once in a CUDA graph and replayed.

Training a 4-bit 7B model with LoRA, batch 1 x 1024, the GPU waits on the
host: each of the ~220 adapted layers costs a few milliseconds of Python and
kernel launches per step against under a millisecond of GPU work. A CUDA
graph records every kernel of one step once and replays them with one launch
from the host, so the step takes what the GPU needs.

What a replay needs, and :class:`GraphedTrainingStep` sees to:

- fixed shapes: each batch is copied into the tensors the capture read
  (a batch of another shape or dtype is refused: pad to one length);
- an optimizer whose step runs on the GPU without reading values back
  (``capturable=True``, with or without ``fused=True``), and a learning rate that is either
  constant or a tensor changed in place (a changed float would be ignored by
  the replay, so it is refused);
- fresh dropout masks each step: LoRA's seeded dropout draws its seeds on the
  host, which a replay repeats, so the graph first advances the device's seed
  salt (:func:`peftkit_lora.dropout.seed_salt`); torch's own random ops
  advance by themselves;
- warm-up: the first steps run eagerly on the side stream that then captures
  the graph (a graph cannot be captured on the default stream), so that lazy
  initialization (that stream's cuBLAS workspace, Triton compilation, the
  optimizer's state) happens before the capture, and only one stream besides
  the caller's holds a cuBLAS workspace.

Gradient accumulation (``accumulation_steps``) replays a second graph, the
update (clipping, optimizer step, zeroed gradients), after every so many
forward-and-backward replays; the two graphs share one memory pool. Without
it, each replay writes the gradients afresh (the capture starts with none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from peftkit_lora.dropout import seed_salt

Batch = Mapping[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]

SALT_PER_REPLAY = 1 << 32  # the replay count goes in the high word of the dropout kernel's 64-bit Philox seed


def model_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """``model(**batch).loss``: the loss transformers' models compute when the batch has labels."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: put labels in the batch, or pass loss_fn=(model, batch) -> loss")
    return loss


class GraphedTrainingStep:
    """``step(batch)`` trains ``model`` on ``batch`` and returns its loss; from the capture on, as CUDA graph replays.

    Each call takes one (micro-)batch; every ``accumulation_steps``-th call
    also clips the gradients and steps the optimizer (the losses' backward is
    scaled by ``1 / accumulation_steps``, so the update is that of the batches'
    mean loss).

    Args:
        model: the model (its trainable parameters on one CUDA device).
        optimizer: over the trainable parameters, created with ``capturable=True`` (``fused=True`` may be added).
        loss_fn: ``loss_fn(model, batch)``; default ``model(**batch).loss``.
        warmup_steps: eager optimizer steps before the capture (at least 1).
        max_grad_norm: clip the gradients' global norm to this before each optimizer step.
        accumulation_steps: batches whose gradients are summed into each optimizer step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn = model_loss,
        *,
        warmup_steps: int = 3,
        max_grad_norm: float | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        for group in optimizer.param_groups:
            if not group.get("capturable"):
                raise ValueError(
                    f"{type(optimizer).__name__} cannot be captured in a CUDA graph as created (torch captures an "
                    "optimizer step only with capturable=True, fused or not): create it with capturable=True, e.g. "
                    "torch.optim.AdamW(params, lr=..., capturable=True)"
                )
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (lazy initialization must happen before the capture), got {warmup_steps}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        compiled = next((name or "the model" for name, m in model.named_modules() if _is_compiled(m)), None)
        if compiled is not None:
            raise ValueError(
                f"{compiled} is compiled with torch.compile (compile_blocks=True does this), with which capturing the "
                "step failed (the stream capture was invalidated): use either compiled modules or GraphedTrainingStep"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        devices = {p.device for p in self.params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            found = ", ".join(sorted(str(d) for d in devices)) or "no trainable parameters"
            raise ValueError(f"GraphedTrainingStep needs the trainable parameters on one CUDA device, found {found}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device = next(iter(devices))
        self.warmup_steps, self.max_grad_norm, self.accumulation_steps = warmup_steps, max_grad_norm, accumulation_steps
        self.calls = 0
        self._stream = torch.cuda.Stream(self.device)
        self._graph: torch.cuda.CUDAGraph | None = None  # forward and backward (and, without accumulation, the update)
        self._update: torch.cuda.CUDAGraph | None = None  # with accumulation: clipping, optimizer step, zeroed gradients
        self._static_batch: dict[str, Any] = {}
        self._static_loss: torch.Tensor | None = None
        self._captured_lrs: list[Any] = []
        self._captured_training = True

    def __call__(self, batch: Batch) -> torch.Tensor:
        """One training step on ``batch``; returns the loss (a new tensor on the GPU, not synchronized)."""
        self._check_devices(batch)
        self._check_model_unchanged()
        updates = (self.calls + 1) % self.accumulation_steps == 0
        if self._graph is None and self.calls < self.warmup_steps * self.accumulation_steps:
            loss = self._eager_step(batch, updates)
        else:
            if self._graph is None:
                self._capture(batch)
            else:
                self._load(batch)
            self._check_learning_rates()
            assert self._graph is not None and self._static_loss is not None
            self._graph.replay()
            if self._update is not None and updates:
                self._update.replay()
            loss = self._static_loss.clone()
        self.calls += 1
        return loss

    def _backward(self, batch: Batch) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        (loss / self.accumulation_steps if self.accumulation_steps > 1 else loss).backward()
        return loss.detach()

    def _update_weights(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()

    def _eager_step(self, batch: Batch, updates: bool) -> torch.Tensor:
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            if self.calls % self.accumulation_steps == 0:
                self.optimizer.zero_grad(set_to_none=True)
            loss = self._backward(batch)
            if updates:
                self._update_weights()
        caller.wait_stream(self._stream)
        return loss

    def _capture(self, batch: Batch) -> None:
        """Capture the step at the start of an accumulation cycle; the caller then replays it."""
        self._static_batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        salt = seed_salt(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        accumulating = self.accumulation_steps > 1
        if accumulating:  # gradients that the graph's backward adds into and the update graph zeroes
            for param in self.params:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.params]  # without accumulation, none: backward allocates them in the graph
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        update = torch.cuda.CUDAGraph() if accumulating else None
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                salt.add_(SALT_PER_REPLAY)
                self._static_loss = self._backward(self._static_batch)
                if update is None:
                    self._update_weights()
            if update is not None:
                if any(param.grad is not grad for param, grad in zip(self.params, grads, strict=True)):
                    raise RuntimeError("backward replaced a gradient instead of adding into it")
                with torch.cuda.graph(update, pool=graph.pool(), stream=self._stream):  # replayed after it, so they share memory
                    self._update_weights()
                    torch._foreach_zero_([grad for grad in grads if grad is not None])
        except Exception as error:
            self.optimizer.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"the training step could not be captured in a CUDA graph ({error}); a step that reads values back to "
                "the host (.item(), data-dependent shapes or branches) or copies to host memory (offload_checkpoints) "
                "cannot be: train it without GraphedTrainingStep"
            ) from error
        self._graph, self._update = graph, update
        self._captured_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._captured_training = self.model.training
        torch.cuda.empty_cache()  # hand back what the eager warm-up steps left cached outside the graph's pool

    def _load(self, batch: Batch) -> None:
        static = self._static_batch
        if batch.keys() != static.keys():
            raise ValueError(f"the batch has keys {sorted(batch)}, the captured step read {sorted(static)}")
        for key, value in batch.items():
            captured = static[key]
            if not isinstance(captured, torch.Tensor):
                if value != captured:
                    raise ValueError(f"batch[{key!r}] is {value!r}, the captured step used {captured!r}")
            elif not isinstance(value, torch.Tensor) or value.shape != captured.shape or value.dtype != captured.dtype:
                found = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"batch[{key!r}] is {found}, the captured step read {tuple(captured.shape)} {captured.dtype}: "
                    "a CUDA graph replays fixed shapes, so pad every batch to one length (e.g. padding='max_length')"
                )
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                static[key].copy_(value, non_blocking=True)

    def _check_model_unchanged(self) -> None:
        """The step trains the parameters it was made for, and replays in the mode it captured: refuse a model changed since."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if len(trainable) != len(self.params) or any(p is not q for p, q in zip(trainable, self.params, strict=False)):
            raise ValueError(
                "the model's trainable parameters changed since this GraphedTrainingStep was made (set_adapter, "
                "requires_grad_, a new adapter), which its graph and clipping would not see: make a new one"
            )
        if self._graph is not None and self.model.training != self._captured_training:
            mode = "training" if self._captured_training else "eval"
            raise ValueError(f"the step was captured in {mode} mode and replays it: switch the model back to {mode} mode")

    def _check_learning_rates(self) -> None:
        for group, captured in zip(self.optimizer.param_groups, self._captured_lrs, strict=True):
            lr = group["lr"]
            if lr is not captured if isinstance(captured, torch.Tensor) else lr != captured:
                raise ValueError(
                    f"the learning rate changed from {captured} to {lr} after the capture, which the graph would ignore: "
                    "create the optimizer with a tensor learning rate (lr=torch.tensor(...)), changed in place, for a "
                    "schedule to take effect"
                )

    def _check_devices(self, batch: Batch) -> None:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.device != self.device:
                raise ValueError(f"batch[{key!r}] is on {value.device}; the step runs on {self.device}: move the batch there first")


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs through torch.compile: ``torch.compile(module)`` or ``module.compile()``."""
    wraps = isinstance(getattr(module, "_orig_mod", None), torch.nn.Module)  # torch.compile's OptimizedModule
    return wraps or module.__dict__.get("_compiled_call_impl") is not None
