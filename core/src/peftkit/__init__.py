"""peftkit: parameter-efficient fine-tuning whose methods are plugins.

Importing ``peftkit`` is cheap: the torch-backed names (``PeftModel``,
``get_peft_model``, ``Adapter``, ``LayerAdapter``) load on first use, so
listing plugins never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from peftkit.lazy import lazy_exports
from peftkit.methods import MethodSpec
from peftkit.plugins import get_registry, make_config

if TYPE_CHECKING:
    from peftkit.adapter import Adapter, LayerAdapter
    from peftkit.model import PeftModel, get_peft_model

__version__ = "0.1.0"

__getattr__ = lazy_exports(
    __name__,
    {
        "PeftModel": "peftkit.model",
        "get_peft_model": "peftkit.model",
        "Adapter": "peftkit.adapter",
        "LayerAdapter": "peftkit.adapter",
    },
)


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
