"""Which modules of a model a config selects, with Hugging Face PEFT's matching rules."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from torch import nn

from peftkit.errors import InjectError

V = TypeVar("V")
ALL_LINEAR = "all-linear"
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches names or dotted name suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index in a name like ``model.layers.3.mlp`` (``None`` if it has none)."""
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    alternatives = "|".join(re.escape(p) for p in (layers_pattern or DEFAULT_LAYER_PATTERNS))
    match = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def pattern_value(patterns: Mapping[str, V], name: str, default: V) -> V:
    """The value of the first ``rank_pattern``-style key matching ``name`` (regex on a name suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's final logits (never targeted by all-linear)."""
    heads: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if output is not None and module is output:
            heads.add(name)
    return heads


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    supported: Callable[[nn.Module], bool],
    is_linear: Callable[[nn.Module], bool],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the modules the config selects, in model order.

    Modules inside a peftkit wrapper (a class with ``is_peftkit_wrapper = True``,
    such as an adapted layer's ``base_layer``) are never selected; the wrapper
    itself is, under its original name. Modules that ``modules_to_save`` names
    (the core trains copies of them in full) and their insides are never
    selected either.

    Raises :class:`InjectError` when nothing matches, or when a selected module
    is of a type the method cannot wrap.
    """
    if target_modules is None:
        raise InjectError("target_modules is not set: name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    skipped = {n for n, _ in model.named_modules() if n and name_matches(n, modules_to_save)}
    all_linear = target_modules == ALL_LINEAR
    if all_linear:
        skipped |= output_head_names(model)
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    chosen: list[str] = []
    inside_wrappers: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside_wrappers):
            continue
        if getattr(module, "is_peftkit_wrapper", False):
            inside_wrappers += (name + ".",)
        if name in skipped or any(name.startswith(s + ".") for s in skipped):
            continue
        if all_linear:
            if not is_linear(module):
                continue
        elif not name_matches(name, target_modules):
            continue
        if name_matches(name, exclude_modules):
            continue
        if layers_to_transform is not None and layer_index(name, layers_pattern) not in layers_to_transform:
            continue
        if not supported(module):
            raise InjectError(
                f"target module {name!r} is a {type(module).__name__}, which this method cannot adapt; "
                f"narrow target_modules"
            )
        chosen.append(name)
    if not chosen:
        raise InjectError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
            f"module names look like {_sample_names(model)}"
        )
    return chosen


def _sample_names(model: nn.Module, count: int = 6) -> list[str]:
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    return leaves[:count]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
