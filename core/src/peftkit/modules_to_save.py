"""``modules_to_save``: whole modules (a classifier head, say) trained in full, one copy per adapter.

Any method's config may list them; the core, not the plugin, owns them, and
writes them under PEFT's keys (``base_model.model.classifier.weight``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftkit.targeting import get_submodule_parent, name_matches

# The heads Hugging Face PEFT trains in full for these task types.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and a trainable copy per adapter; runs the active one."""

    is_peftkit_wrapper = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.rows: dict[str, torch.Tensor] | None = None

    def add(self, adapter_name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(False)
        self.modules_to_save[adapter_name] = copied

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.rows is not None:
            return self._mixed_forward(x, *args, **kwargs)
        return self.copy_for(self.active_adapter)(x, *args, **kwargs)

    def copy_for(self, adapter_name: str | None) -> nn.Module:
        """The adapter's trained copy, or the original module when it has none."""
        if adapter_name is not None and adapter_name in self.modules_to_save:
            return self.modules_to_save[adapter_name]
        return self.original_module

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.original_module(x, *args, **kwargs)
        assert self.rows is not None
        for name, rows in self.rows.items():
            if name in self.modules_to_save:
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs).to(out.dtype))
        return out


def wrap_modules_to_save(model: nn.Module, patterns: Iterable[str], adapter_name: str, task_type: str | None = None) -> list[str]:
    """Give ``adapter_name`` its own trainable copy of each matching module; return their names.

    Every pattern must match, except the task's usual head names (PEFT lists
    both "classifier" and "score" for SEQ_CLS whatever the model has).
    """
    patterns = list(patterns)
    found: list[str] = []
    inside_wrappers = tuple(n + "." for n in saved_wrappers(model))
    for name, _module in list(model.named_modules()):
        if not name or name.startswith(inside_wrappers):
            continue
        if name_matches(name, patterns) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    optional = TASK_HEADS.get(task_type or "", ())
    missing = [p for p in patterns if p not in optional and not any(name_matches(n, [p]) for n in found)]
    if missing:
        from peftkit.errors import InjectError

        raise InjectError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    for name in found:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            parent, attr = get_submodule_parent(model, name)
            wrapper = ModulesToSaveWrapper(wrapper)
            setattr(parent, attr, wrapper)
        wrapper.add(adapter_name)
    return found


def saved_wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """Every :class:`ModulesToSaveWrapper` in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def remove_copy(model: nn.Module, name: str, adapter_name: str) -> None:
    """Drop ``adapter_name``'s copy; restore the original module when no copy is left."""
    wrapper = model.get_submodule(name)
    if not isinstance(wrapper, ModulesToSaveWrapper):
        return
    if adapter_name in wrapper.modules_to_save:
        del wrapper.modules_to_save[adapter_name]
    if not len(wrapper.modules_to_save):
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, wrapper.original_module)


def unwrap_all(model: nn.Module, keep: str | None) -> None:
    """Replace every wrapper by the ``keep`` adapter's copy (or the original when it has none)."""
    for name, wrapper in saved_wrappers(model).items():
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, wrapper.copy_for(keep))
