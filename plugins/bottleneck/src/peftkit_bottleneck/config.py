"""BottleneckConfig: bottleneck adapters. Hugging Face PEFT has no such method, so these fields are peftkit's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError, PeftConfig

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters: ``up(act(down(h)))`` added to a module's output (Houlsby et al., 2019).

    ``adapter_type``: ``"houlsby"`` puts a sequential adapter after the
    attention output projection and after the feed-forward output projection
    of every block; ``"pfeiffer"`` only after the feed-forward one;
    ``"parallel"`` puts one beside each of the modules houlsby uses: it reads
    the wrapped module's *input* and adds ``scaling * adapter(input)`` to its
    output. ``target_modules`` (names or name suffixes, or a full-match regex)
    replaces the per-architecture placement. The bottleneck has
    ``hidden_size // reduction_factor`` units, ``hidden_size`` being the
    wrapped module's output width. The up-projection starts at zero, so a new
    adapter is an exact no-op; ``init_weights=False`` starts it random (for tests).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter_type!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if (
            isinstance(self.reduction_factor, bool)
            or not isinstance(self.reduction_factor, int)
            or self.reduction_factor <= 0
        ):
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if isinstance(data["target_modules"], list):
            data["target_modules"] = sorted(set(data["target_modules"]))
        return data
