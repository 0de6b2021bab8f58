"""The rank allocator: importance of singular triplets and the cubic budget schedule (AdaLoRA, Zhang et al. 2023).

The sensitivity of every adapter weight, ``|w * dL/dw|``, is recorded by a
gradient hook at the end of each backward pass, so the allocation step may run
before or after ``optimizer.zero_grad()``. One :meth:`RankAllocator.update_and_allocate`
call per optimizer step folds the latest sensitivities into the moving averages
and, on allocation steps, zeroes the singular values outside the budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peftkit import PeftkitError
from peftkit_adalora.config import RANK_KEY, AdaLoraConfig, module_rank_masks
from peftkit_adalora.layers import SVDLayer

ParamKey = tuple[str, str]  # (target module name, "lora_A" | "lora_E" | "lora_B")
TRIPLET_ATTRS = ("lora_A", "lora_E", "lora_B")


class AllocationError(PeftkitError, RuntimeError):
    """The rank allocation step was called where it cannot work (no gradients, frozen adapter, ...)."""


class RankAllocator:
    """Allocates the rank budget of one AdaLoRA adapter across its target modules.

    ``slots[target]`` lists, for each live triplet of the module, its position
    among the ``init_r`` original ones, so that ``rank_pattern`` (``init_r``
    booleans per module) stays valid for adapters loaded at a reduced rank.
    """

    def __init__(
        self, name: str, config: AdaLoraConfig, layers: dict[str, SVDLayer], slots: dict[str, list[int]]
    ) -> None:
        self.name = name
        self.config = config
        self.layers = layers
        self.slots = slots
        self.initial_budget = sum(len(s) for s in slots.values())
        self.target_budget = config.target_r * len(layers)
        self._latest: dict[ParamKey, torch.Tensor] = {}
        self._sensitivity: dict[ParamKey, torch.Tensor] = {}
        self._uncertainty: dict[ParamKey, torch.Tensor] = {}
        self._final_keep: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ recording
    def parameters_by_key(self) -> dict[ParamKey, nn.Parameter]:
        return {
            (t, attr): getattr(layer, attr)[self.name] for t, layer in self.layers.items() for attr in TRIPLET_ATTRS
        }

    def recorder(self, key: ParamKey) -> Callable[[torch.Tensor], None]:
        """A post-accumulate-grad hook storing ``|w * grad|`` of one parameter (grad accumulated over backwards)."""

        def record(param: torch.Tensor) -> None:
            if param.grad is not None:
                self._latest[key] = (param.detach() * param.grad.detach()).abs()

        return record

    # ------------------------------------------------------------- schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at ``step``, whether ``step`` re-allocates), PEFT's and the paper's cubic schedule."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_and_allocate(self, global_step: int) -> int:
        """Fold in this step's sensitivities and re-allocate when the schedule says so; returns the budget.

        ``global_step`` counts optimizer steps from 1 (``Trainer``'s ``state.global_step``).
        Steps up to ``tinit`` only warm the averages up; at ``total_step - tfinal``
        the final allocation (``target_r`` per module on average) is fixed and
        re-applied on every later call.
        """
        assert self.config.total_step is not None
        final_step = self.config.total_step - self.config.tfinal
        if global_step < final_step:
            self._update_scores(global_step)
            budget, allocate = self.budget_schedule(global_step)
            if allocate:
                self._allocate(budget)
            return budget
        if self._final_keep is None:
            if not self._sensitivity:
                raise AllocationError(
                    f"update_and_allocate reached step {global_step} (>= total_step - tfinal = {final_step}) with no "
                    f"importance scores: call it after every optimizer step from the first one"
                )
            self._final_keep = self._allocate(self.target_budget)
            self._sensitivity.clear(), self._uncertainty.clear(), self._latest.clear()
        else:
            self._mask(self._final_keep)
        return self.target_budget

    # --------------------------------------------------------------- scores
    def _update_scores(self, step: int) -> None:
        if not self._latest:
            raise AllocationError(
                f"update_and_allocate(step {step}) found no gradients since its last call: call it once per optimizer "
                f"step, after loss.backward() (before or after optimizer.zero_grad()), on a trainable adapter"
            )
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, param in self.parameters_by_key().items():
            latest = self._latest.get(key)
            if latest is None:  # the module took no part in this step's loss
                latest = torch.zeros_like(param.detach())
            if key not in self._sensitivity:
                self._sensitivity[key], self._uncertainty[key] = torch.zeros_like(latest), torch.zeros_like(latest)
            smoothed = beta1 * self._sensitivity[key] + (1 - beta1) * latest
            self._sensitivity[key] = smoothed
            self._uncertainty[key] = beta2 * self._uncertainty[key] + (1 - beta2) * (latest - smoothed).abs()
        self._latest.clear()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module, one score per triplet: ``s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``, with ``s = Ī * Ū``."""
        scores = {}
        for target in self.layers:
            s = {attr: self._sensitivity[(target, attr)] * self._uncertainty[(target, attr)] for attr in TRIPLET_ATTRS}
            scores[target] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    # ------------------------------------------------------------- masking
    def _allocate(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the ``budget`` highest-scoring triplets over all modules, zero the others' singular values."""
        scores = self.triplet_scores()
        flat = torch.cat([s.float().cpu() for s in scores.values()])
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        order = torch.sort(flat, descending=True, stable=True).indices
        kept[order[:budget]] = True
        keep, start = {}, 0
        for target, score in scores.items():
            keep[target] = kept[start : start + score.numel()]
            start += score.numel()
        self._mask(keep)
        self.config.rank_pattern = {
            f"{target}.{RANK_KEY}": self._full_mask(target, mask) for target, mask in keep.items()
        }
        return keep

    def _mask(self, keep: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for target, mask in keep.items():
                values = self.layers[target].lora_E[self.name]
                values.masked_fill_(~mask.to(values.device).view(-1, 1), 0.0)

    def _full_mask(self, target: str, live_mask: torch.Tensor) -> list[bool]:
        """``init_r`` booleans from a mask over the module's live triplets."""
        full = [False] * self.config.init_r
        for slot, on in zip(self.slots[target], live_mask.tolist(), strict=True):
            full[slot] = on
        return full

    def ranks(self) -> dict[str, int]:
        """The rank of each module: its kept triplets if an allocation was made, else its live rank."""
        masks = module_rank_masks(self.config.rank_pattern or {}, self.config.init_r)
        return {t: sum(masks[t]) if t in masks else len(s) for t, s in self.slots.items()}
