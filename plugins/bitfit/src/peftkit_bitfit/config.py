"""BitFitConfig: which bias terms to train. Hugging Face PEFT has no BitFit, so these fields are peftkit's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError, PeftConfig


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: train only the bias terms of the model (Ben Zaken et al., 2021); everything else stays frozen.

    ``target_modules``: ``None`` trains the bias of every module that has one
    (Linear, Conv1D, LayerNorm, ...); otherwise only the biases of modules
    whose names match (PEFT's rules: a list matches names or dotted name
    suffixes, a string is a full-match regex, ``"all-linear"`` is every
    Linear/Conv1D but the output head). ``exclude_modules`` removes matches.
    ``add_missing_biases=True`` gives the targeted Linear/Conv1D layers that
    have no bias a zero bias (a no-op until trained), for models such as Llama
    and T5; they are removed again when the adapter is deleted or unloaded.
    ``init_weights=False`` adds Gaussian noise to the trained biases (for tests).
    """

    peft_type: ClassVar[str] = "BITFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    add_missing_biases: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a list of names or a regex string, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(data[name], list):
                data[name] = sorted(set(data[name]))
        return data
