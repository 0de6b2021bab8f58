"""ShiftConfig: the fields written to ``adapter_config.json`` (plain dataclass, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit import PeftConfig


@dataclass
class ShiftConfig(PeftConfig):
    """``out = base(x) + v`` on each target layer, with one trained vector ``v`` per layer.

    ``target_modules`` follows Hugging Face PEFT's rules: a list matches module
    names or name suffixes, a string is a full-match regex, ``"all-linear"``
    is every Linear/Conv1D layer but the output head. ``init_zero=False``
    starts ``v`` random instead of zero (for tests: an adapter that changes outputs).
    """

    peft_type: ClassVar[str] = "SHIFT"  # the value of "peft_type" in adapter_config.json

    target_modules: list[str] | str | None = None
    init_zero: bool = True
