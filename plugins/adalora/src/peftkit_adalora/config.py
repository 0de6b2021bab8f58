"""AdaLoraConfig: Hugging Face PEFT's AdaLoRA fields, with the same names and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError, PeftConfig

_BIASES = ("none", "all", "lora_only")
RANK_KEY = "lora_E"  # rank_pattern keys are "<module name>.lora_E", as PEFT writes them


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA: ``W x + (lora_alpha / init_r) * P Λ Q x``, with ranks moved between modules while training.

    Each target module starts with ``init_r`` singular triplets (``Λ = 0`` at
    init, so the adapter is a no-op). Training over ``total_step`` optimizer
    steps cuts the total to ``target_r`` per module on average: no change during
    the first ``tinit`` steps, a cubic decrease re-allocated every ``deltaT``
    steps, and a fixed final allocation for the last ``tfinal`` steps. The
    importance of a triplet is the smoothed sensitivity ``|w * grad|`` (EMA with
    ``beta1``) times its uncertainty (EMA with ``beta2``). ``rank_pattern`` is
    written by training: ``{"<module>.lora_E": [keep, ...]}`` with ``init_r``
    booleans per module. ``r`` is PEFT's unused LoRA field, kept for its format.
    """

    peft_type: ClassVar[str] = "ADALORA"
    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset({"megatron_core", "qalora_group_size"})

    r: int = 8
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ConfigError(f"init_r must be a positive integer, got {self.init_r!r}")
        if not isinstance(self.target_r, int) or self.target_r < 0:
            raise ConfigError(f"target_r must be a non-negative integer, got {self.target_r!r}")
        if self.r != 8:
            warnings.warn(
                "AdaLoRA ignores r; set the initial rank with init_r and the final average with target_r", stacklevel=3
            )
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError(
                f"AdaLoRA needs total_step, the number of optimizer steps of training (> 0), got {self.total_step!r}"
            )
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no budgeting phase; "
                f"need 0 <= tinit < total_step - tfinal"
            )
        if not isinstance(self.deltaT, int) or self.deltaT < 1:
            raise ConfigError(f"deltaT (steps between allocations) must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIASES:
            raise ConfigError(f"bias must be one of {_BIASES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"init_lora_weights must be True (Λ = 0, a no-op) or False (random), got {self.init_lora_weights!r}"
            )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if (
            isinstance(self.target_modules, str)
            and self.target_modules != "all-linear"
            and self.layers_to_transform is not None
        ):
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; use a list")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern needs layers_to_transform")
        if self.rank_pattern is not None:
            module_rank_masks(self.rank_pattern, self.init_r)

    def scaling(self) -> float:
        """The factor on ``P Λ Q x``: PEFT's ``lora_alpha / (init_r + 1e-5)`` (``init_r / init_r`` if alpha is 0)."""
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return alpha / (self.init_r + 1e-5)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if isinstance(data["target_modules"], list):
            data["target_modules"] = sorted(set(data["target_modules"]))
        return data


def module_rank_masks(rank_pattern: dict[str, Any], init_r: int) -> dict[str, list[bool]]:
    """``{module name: init_r booleans}`` from a rank_pattern whose keys are ``<module>.lora_E``.

    Also accepts PEFT's in-training keys ``<module>.lora_E.<adapter>``. Raises
    :class:`peftkit.ConfigError` for anything else, such as LoRA's ``{name: rank}``.
    """
    if not isinstance(rank_pattern, dict):
        raise ConfigError(f"rank_pattern must be a dict, got {type(rank_pattern).__name__}")
    masks: dict[str, list[bool]] = {}
    for key, mask in rank_pattern.items():
        module, found, adapter = str(key).rpartition(f".{RANK_KEY}")
        if not found or not module or (adapter and (adapter[0] != "." or "." in adapter[1:])):
            raise ConfigError(
                f"rank_pattern key {key!r} is not '<module name>.{RANK_KEY}' as AdaLoRA training writes it"
            )
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(k, bool) for k in mask):
            raise ConfigError(
                f"rank_pattern[{key!r}] must be a list of init_r={init_r} booleans (which singular values to keep); "
                f"AdaLoRA sets it while training, so set init_r / target_r instead of ranks"
            )
        masks[module] = mask
    return masks
