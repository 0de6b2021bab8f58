"""Adapter configs: plain dataclasses that read and write PEFT's ``adapter_config.json`` fields.

Importing this module does not import torch, so plugins can declare their
config classes cheaply and ``peftkit methods`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from typing_extensions import Self

from peftkit.errors import ConfigError

C = TypeVar("C", bound="PeftConfig")

CONFIG_NAME = "adapter_config.json"
TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "SEQ_CLS",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# Fields Hugging Face PEFT writes that carry no meaning for the adapter's math.
_BOOKKEEPING_FIELDS = frozenset({"peft_type", "peft_version", "auto_mapping"})


@dataclass
class PeftConfig:
    """Fields every method shares. Subclasses add their own and set ``peft_type``.

    ``peft_type`` is the value written to ``adapter_config.json`` (``"LORA"``);
    ``IGNORED_FIELDS`` lists foreign fields (written by Hugging Face PEFT) that
    may be read and dropped whatever their value.
    """

    peft_type: ClassVar[str] = ""
    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset()

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(
                f"task_type {self.task_type!r} is not known; use one of {', '.join(TASK_TYPES)} or None"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json`` (PEFT's field names)."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build a config from a dict such as PEFT's ``adapter_config.json``.

        Unknown fields are dropped when empty (``None``, ``False``, ``{}``,
        ``[]``) or listed in ``IGNORED_FIELDS``; an unknown field that is set
        means a feature this plugin does not implement, which is an error
        rather than a silently different adapter.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        declared = data.get("peft_type")
        if declared is not None and declared != cls.peft_type:
            raise ConfigError(f"config has peft_type {declared!r}, but {cls.__name__} reads {cls.peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _BOOKKEEPING_FIELDS or key in cls.IGNORED_FIELDS or _is_empty(value):
                continue
            else:
                raise ConfigError(
                    f"{cls.peft_type} adapter sets {key}={value!r}, which this peftkit plugin does not "
                    f"support; remove the field or use an adapter without that feature"
                )
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid {cls.peft_type} config: {exc}") from exc


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """Read an ``adapter_config.json`` file, with a clear error when it is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: an adapter folder needs {CONFIG_NAME}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ConfigError(f"{path} lacks the field 'peft_type', so its method is unknown")
    return data


__all__ = ["CONFIG_NAME", "TASK_TYPES", "PeftConfig", "field", "read_config_dict"]
