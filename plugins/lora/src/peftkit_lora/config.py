"""LoraConfig: Hugging Face PEFT's LoRA fields, with the same names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from peftkit import ConfigError, PeftConfig

InitLora = bool | Literal["gaussian"]
_INITS = (True, False, "gaussian")
_BIASES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: ``W x + (alpha / r) * B A dropout(x)``, with ``B = 0`` at init.

    ``target_modules``: a list matches module names or name suffixes, a string
    is a full-match regex, ``"all-linear"`` is every linear layer but the output
    head. ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha``
    for modules whose name matches a key (a regex on the name's end).
    """

    peft_type: ClassVar[str] = "LORA"
    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset({"megatron_core", "qalora_group_size"})

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: InitLora = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if any(not isinstance(v, int) or v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"rank_pattern values must be positive integers, got {self.rank_pattern}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIASES:
            raise ConfigError(f"bias must be one of {_BIASES}, got {self.bias!r}")
        if self.init_lora_weights not in _INITS:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True (B = 0), "
                f"'gaussian' or False (random, for tests)"
            )
        if self.use_dora:
            raise ConfigError("use_dora=True (DoRA) is not implemented by peftkit-lora; set use_dora=False")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.layers_to_transform is not None and self.target_modules is not None and isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; use a list")

    def scaling(self, r: int, alpha: float) -> float:
        """The factor applied to ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if isinstance(data["target_modules"], list):
            data["target_modules"] = sorted(set(data["target_modules"]))
        return data
