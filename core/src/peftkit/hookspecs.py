"""The method contract: the pluggy hooks a PEFT method plugin implements.

A method plugin is a module (named by an entry point in the ``peftkit`` group)
with functions decorated by :data:`peftkit.hookimpl`. Every hook but the
registration hook is ``firstresult``: an implementation returns ``None`` for a
config that is not its own method, and the core turns "nobody answered" into
an error that names the package to install. :func:`peftkit.method_hooks`
builds the usual implementations of the four per-adapter hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import pluggy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from peftkit.adapter import Adapter
    from peftkit.config import PeftConfig
    from peftkit.methods import MethodSpec

PROJECT = "peftkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

MergeAction = Literal["merge", "unmerge", "unload"]


@hookspec
def peftkit_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare this plugin's methods by calling ``register(MethodSpec(...))`` once per method."""


@hookspec(firstresult=True)
def peftkit_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> Adapter | None:
    """Add adapter ``adapter_name`` described by ``config`` to ``model``, in place.

    Wrap or replace the target modules, or register prompt parameters, and
    return an :class:`peftkit.Adapter` that knows what was touched. Raise
    :class:`peftkit.InjectError` (and leave the model unchanged) when the config
    selects nothing or cannot apply to this model.
    """


@hookspec(firstresult=True)
def peftkit_forward(
    adapter: Adapter,
    config: PeftConfig,
    inputs: dict[str, Any],
    rows: dict[str, Tensor] | None,
) -> AbstractContextManager[dict[str, Any]] | None:
    """Called once per forward (and once per ``generate``) of the wrapped model.

    ``inputs`` are the keyword arguments of the call; ``rows`` maps adapter
    names to the batch rows (1-d long tensors) that use them when the caller
    asked for a mixed batch (``adapter_names=[...]``), ``"__base__"`` included
    for rows that use no adapter; else ``None``. Return a context manager
    that yields the (possibly rewritten) inputs and undoes any per-call state on
    exit. The core calls this hook only for methods whose spec sets
    ``rewrites_inputs`` or, for mixed batches, ``mixed_batches``.
    """


@hookspec(firstresult=True)
def peftkit_state_dict(
    adapter: Adapter, config: PeftConfig, tensors: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """Name the adapter's tensors as they are written to disk, and take them back.

    With ``tensors=None`` return ``{disk_key: tensor}`` in Hugging Face PEFT's
    key names (adapter name stripped). Otherwise copy ``tensors`` into the
    adapter and return ``{}``; raise :class:`peftkit.AdapterLoadError` naming
    missing keys, unexpected keys or mismatched shapes, changing nothing.
    """


@hookspec(firstresult=True)
def peftkit_merge(adapter: Adapter, config: PeftConfig, action: MergeAction) -> bool | None:
    """Fold the adapter into the base weights ("merge"), take it back out ("unmerge"),
    or remove it from the model, restoring the original modules ("unload").

    Return ``True`` when done. A method that cannot merge raises
    :class:`peftkit.MergeError` for "merge" and "unmerge" saying why.
    """
