"""IA3Config: Hugging Face PEFT's (IA)^3 fields, with the same names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError, PeftConfig


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: a learned vector ``l`` per target layer, initialised to ones.

    A target in ``feedforward_modules`` computes ``W (l * x)`` (the vector scales
    the layer's input, ``in_features`` long); any other target computes
    ``l * (W x + b)`` (it scales the output, ``out_features`` long).

    ``target_modules``: a list matches module names or dotted name suffixes, a
    string is a full-match regex, ``"all-linear"`` is every Linear/Conv1D but
    the output head. ``feedforward_modules``: a regex (full match), or a list
    whose entries match when a target's name *ends with* them (PEFT's rule, no
    dot boundary). Either left at ``None`` takes PEFT's default for the model's
    architecture when there is one. ``fan_in_fan_out`` is informational: it is
    set to ``True`` on inject when a target is a GPT-2 style ``Conv1D``.
    ``init_ia3_weights=False`` starts the vectors random (for tests).
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a list of names or a regex string, got {type(value).__name__}")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            # PEFT demands a strict subset, which rejects its own saved "all-linear" adapters (targets
            # written as full names); an entry that ends a target name is accepted here too.
            strays = [f for f in self.feedforward_modules if not any(t.endswith(f) for t in self.target_modules)]
            if strays:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules; {sorted(strays)} name no target"
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(data[name], list):
                data[name] = sorted(set(data[name]))
        return data
