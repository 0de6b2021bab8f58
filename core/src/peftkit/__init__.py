"""peftkit: parameter-efficient fine-tuning whose methods are plugins.

Importing ``peftkit`` is cheap: the torch-backed names (``PeftModel``,
``get_peft_model``, ``Adapter``, ``LayerAdapter``) load on first use, so
listing plugins never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from peftkit.config import PeftConfig
from peftkit.errors import (
    AdapterLoadError,
    ConfigError,
    InjectError,
    MergeError,
    MethodNotInstalledError,
    PeftkitError,
    PluginError,
)
from peftkit.hookimpls import method_hooks
from peftkit.hookspecs import hookimpl
from peftkit.methods import MethodSpec
from peftkit.plugins import get_registry, make_config

if TYPE_CHECKING:
    from peftkit.adapter import Adapter, LayerAdapter
    from peftkit.model import PeftModel, get_peft_model

__version__ = "0.1.0"

_LAZY = {
    "PeftModel": "peftkit.model",
    "get_peft_model": "peftkit.model",
    "Adapter": "peftkit.adapter",
    "LayerAdapter": "peftkit.adapter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "AdapterLoadError",
    "ConfigError",
    "InjectError",
    "LayerAdapter",
    "MergeError",
    "MethodNotInstalledError",
    "MethodSpec",
    "PeftConfig",
    "PeftModel",
    "PeftkitError",
    "PluginError",
    "get_peft_model",
    "get_registry",
    "hookimpl",
    "make_config",
    "method_hooks",
]
