"""Plugin discovery: entry points in the ``peftkit`` group, loaded one by one.

A plugin that fails to import is recorded as broken and everything else keeps
working (``PEFTKIT_STRICT_PLUGINS=1`` makes it an error).
``PEFTKIT_LOAD_PLUGINS=a,b`` loads only the named distributions (``''`` none).
Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from importlib import import_module, metadata
from typing import Any

import pluggy

from peftkit import hookspecs
from peftkit.config import PeftConfig
from peftkit.errors import ConfigError, MethodNotInstalledError, PluginError
from peftkit.methods import MethodSpec

ENTRY_POINT_GROUP = "peftkit"
# Where the core knows which distribution provides a PEFT method, so that
# "not installed" errors can name the package to install.
KNOWN_PACKAGES = {
    "LORA": "peftkit-lora",
    "ADALORA": "peftkit-adalora",
    "IA3": "peftkit-ia3",
    "BITFIT": "peftkit-bitfit",
    "BOTTLENECK": "peftkit-bottleneck",
    "PREFIX_TUNING": "peftkit-prefix",
    "P_TUNING": "peftkit-ptuning",
    "PROMPT_TUNING": "peftkit-prompt",
}


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded or registered."""

    distribution: str
    entry_point: str
    error: str


@dataclass
class Registry:
    """The loaded plugins: a pluggy manager plus the methods they declared."""

    manager: pluggy.PluginManager
    methods: dict[str, MethodSpec]
    broken: list[BrokenPlugin]

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def method(self, name: str) -> MethodSpec:
        """The spec of an installed method, by short name (``"lora"``) or peft_type (``"LORA"``)."""
        for spec in self.methods.values():
            if name in (spec.name, spec.peft_type):
                return spec
        raise MethodNotInstalledError(_not_installed_message(name))

    def method_for_config(self, config: PeftConfig) -> MethodSpec:
        """The spec whose config class is the config's own class (most derived wins)."""
        for klass in type(config).__mro__:
            for spec in self.methods.values():
                if spec.config_class is klass:
                    return spec
        return self.method(config.peft_type)


def _not_installed_message(name: str) -> str:
    package = KNOWN_PACKAGES.get(name.upper(), f"peftkit-{name.lower().replace('_', '-')}")
    return f"method {name!r} is not installed: pip install {package}"


def _wanted_distributions() -> set[str] | None:
    raw = os.environ.get("PEFTKIT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {_normalise(part) for part in raw.split(",") if part.strip()}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _strict() -> bool:
    return os.environ.get("PEFTKIT_STRICT_PLUGINS", "") not in ("", "0", "false")


def build_registry() -> Registry:
    """Discover, import and register every ``peftkit`` entry point (uncached)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    wanted = _wanted_distributions()
    methods: dict[str, MethodSpec] = {}
    broken: list[BrokenPlugin] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else ""
        if wanted is not None and _normalise(dist) not in wanted:
            continue
        try:
            module = import_module(ep.value)
            plugin_name = f"{dist}:{ep.name}"
            manager.register(module, name=plugin_name)
            declared: list[MethodSpec] = []
            for impl in manager.hook.peftkit_register_methods.get_hookimpls():
                if impl.plugin_name == plugin_name:
                    impl.function(register=declared.append)
        except Exception as exc:  # a broken plugin must not take the others down
            if _strict():
                raise PluginError(f"plugin {ep.name!r} from {dist} failed to load: {exc!r}") from exc
            broken.append(BrokenPlugin(dist, ep.name, f"{type(exc).__name__}: {exc}"))
            _unregister_quietly(manager, f"{dist}:{ep.name}")
            continue
        for spec in declared:
            for other in methods.values():
                if spec.name == other.name or spec.peft_type == other.peft_type:
                    claimed = f"method {spec.name!r}" if spec.name == other.name else f"peft_type {spec.peft_type!r}"
                    owners = f"two distributions, {other.distribution} and {dist}" if other.distribution != dist else f"{dist} twice"
                    raise PluginError(f"{claimed} is claimed by {owners}; uninstall one of them")
            methods[spec.name] = replace(spec, distribution=dist, version=version)
    return Registry(manager, methods, broken)


def _unregister_quietly(manager: pluggy.PluginManager, name: str) -> None:
    plugin = manager.get_plugin(name)
    if plugin is not None:
        manager.unregister(plugin=plugin, name=name)


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()


def make_config(method: str, **fields: Any) -> PeftConfig:
    """Build a config by method name (``make_config("lora", r=8)``), for YAML files and the CLI."""
    return get_registry().method(method).config_class(**fields)


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Build the right config class for an ``adapter_config.json`` dict, by its ``peft_type``."""
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConfigError("adapter config has no string 'peft_type', so its method is unknown")
    return get_registry().method(peft_type).config_class.from_dict(data)
