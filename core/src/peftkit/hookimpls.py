"""The standard implementations of the four per-adapter hooks, written once for every method plugin.

Most methods answer ``peftkit_inject``, ``peftkit_forward``,
``peftkit_state_dict`` and ``peftkit_merge`` alike: ``None`` for another
method's config; else import the method's torch module and call its
``inject``, or hand the work to the :class:`peftkit.Adapter` that ``inject``
returned. :func:`method_hooks` builds those implementations; a plugin module
assigns them to the hook names, which is how pluggy finds them::

    peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge = method_hooks(
        ShiftConfig, "peftkit_template.shift:inject"
    )

Nothing here imports torch: the inject module loads on the first ``peftkit_inject``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib import import_module
from typing import TYPE_CHECKING, Any, NamedTuple

from peftkit.hookspecs import MergeAction, hookimpl

if TYPE_CHECKING:
    from torch import Tensor, nn

    from peftkit.adapter import Adapter
    from peftkit.config import PeftConfig


class MethodHooks(NamedTuple):
    """One method's implementations of the per-adapter hooks, in the order of ``peftkit.hookspecs``."""

    inject: Callable[..., Adapter | None]
    forward: Callable[..., AbstractContextManager[dict[str, Any]] | None]
    state_dict: Callable[..., dict[str, Tensor] | None]
    merge: Callable[..., bool | None]


def method_hooks(config_class: type[PeftConfig], inject: str) -> MethodHooks:
    """The hook implementations of the method whose configs are instances of ``config_class``.

    ``inject`` names the function that adds an adapter, ``"module:function"``,
    called as ``function(model, config, adapter_name)``; its module is imported
    on the first call, so it may import torch. The other hooks call the
    adapter: ``forward(inputs, rows)``; ``state_dict()`` to save and
    ``load_state_dict(tensors)`` to load; ``merge()``, ``unmerge()`` or
    ``unload()``. Each returns ``None`` for configs of other methods.
    """
    module_name, _, function_name = inject.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"inject must be 'module:function', got {inject!r}")

    @hookimpl
    def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> Adapter | None:
        if not isinstance(config, config_class):
            return None
        function: Callable[[nn.Module, PeftConfig, str], Adapter] = getattr(import_module(module_name), function_name)
        return function(model, config, adapter_name)

    @hookimpl
    def peftkit_forward(
        adapter: Adapter, config: PeftConfig, inputs: dict[str, Any], rows: dict[str, Tensor] | None
    ) -> AbstractContextManager[dict[str, Any]] | None:
        if not isinstance(config, config_class):
            return None
        return adapter.forward(inputs, rows)

    @hookimpl
    def peftkit_state_dict(
        adapter: Adapter, config: PeftConfig, tensors: dict[str, Tensor] | None
    ) -> dict[str, Tensor] | None:
        if not isinstance(config, config_class):
            return None
        if tensors is None:
            return adapter.state_dict()
        adapter.load_state_dict(tensors)
        return {}

    @hookimpl
    def peftkit_merge(adapter: Adapter, config: PeftConfig, action: MergeAction) -> bool | None:
        if not isinstance(config, config_class):
            return None
        {"merge": adapter.merge, "unmerge": adapter.unmerge, "unload": adapter.unload}[action]()
        return True

    return MethodHooks(peftkit_inject, peftkit_forward, peftkit_state_dict, peftkit_merge)
