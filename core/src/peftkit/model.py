"""PeftModel: the wrapper users hold, and the adapter lifecycle (add, switch, merge, save, load)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from peftkit import io
from peftkit.adapter import Adapter
from peftkit.config import PeftConfig, read_config_dict
from peftkit.errors import AdapterLoadError, ConfigError, MergeError, MethodNotInstalledError
from peftkit.methods import MethodSpec
from peftkit.modules_to_save import (
    TASK_HEADS,
    ModulesToSaveWrapper,
    remove_copy,
    saved_wrappers,
    unwrap_all,
    wrap_modules_to_save,
)
from peftkit.plugins import config_from_dict, get_registry

BASE = "__base__"  # the name of "no adapter" in a mixed batch


class PeftModel(nn.Module):
    """A model with one or more adapters. Attributes it lacks are looked up on the base model."""

    # transformers.Trainer refuses to train a quantized model (is_quantized, looked up on the base)
    # unless it carries adapters, which it recognises by this flag or by being a peft.PeftModel.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._adapters: dict[str, Adapter] = {}
        self._specs: dict[str, MethodSpec] = {}
        self._saved_modules: dict[str, list[str]] = {}
        self.active_adapter: str | None = None
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ----------------------------------------------------------------- adapters
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._require_active()]

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add an adapter (inactive unless it is the first); the model is unchanged if this fails."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self._adapters:
            raise ConfigError(f"adapter {adapter_name!r} already exists; delete_adapter it or pick another name")
        registry = get_registry()
        spec = registry.method_for_config(config)
        heads = TASK_HEADS.get(config.task_type or "", ())
        if heads:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        adapter = registry.hook.peftkit_inject(model=self.base_model, config=config, adapter_name=adapter_name)
        if adapter is None:
            raise MethodNotInstalledError(f"no installed plugin injects {type(config).__name__}; is its plugin disabled?")
        try:
            saved = wrap_modules_to_save(self.base_model, config.modules_to_save or [], adapter_name, config.task_type)
        except Exception:
            registry.hook.peftkit_merge(adapter=adapter, config=config, action="unload")
            raise
        self.peft_config[adapter_name] = config
        self._adapters[adapter_name] = adapter
        self._specs[adapter_name] = spec
        self._saved_modules[adapter_name] = saved
        adapter.set_active(False)
        self._update_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one adapter in effect (and trainable unless in inference mode)."""
        self._require(adapter_name)
        if self.active_adapter and self._adapters[self.active_adapter].merged:
            raise MergeError(f"adapter {self.active_adapter!r} is merged; unmerge_adapter() before switching")
        for name, adapter in self._adapters.items():
            adapter.set_active(name == adapter_name)
        for wrapper in saved_wrappers(self.base_model).values():
            wrapper.active_adapter = adapter_name
        self.active_adapter = adapter_name
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and every module, parameter and buffer it added."""
        adapter = self._require(adapter_name)
        hook = get_registry().hook
        for param in adapter.parameters():
            param.requires_grad_(False)
        if adapter.merged:
            hook.peftkit_merge(adapter=adapter, config=adapter.config, action="unmerge")
        hook.peftkit_merge(adapter=adapter, config=adapter.config, action="unload")
        for name in self._saved_modules.pop(adapter_name):
            remove_copy(self.base_model, name, adapter_name)
        del self._adapters[adapter_name], self.peft_config[adapter_name], self._specs[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            remaining = list(self._adapters)
            if remaining:
                self.set_adapter(remaining[0])

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside this block (merged adapters are unmerged meanwhile)."""
        hook = get_registry().hook
        merged = [a for a in self._adapters.values() if a.merged]
        wrappers = saved_wrappers(self.base_model).values()
        for adapter in merged:
            hook.peftkit_merge(adapter=adapter, config=adapter.config, action="unmerge")
        for adapter in self._adapters.values():
            adapter.set_active(False)
        for wrapper in wrappers:
            wrapper.active_adapter = None
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.active_adapter = self.active_adapter
            for name, adapter in self._adapters.items():
                adapter.set_active(name == self.active_adapter)
            for adapter in merged:
                hook.peftkit_merge(adapter=adapter, config=adapter.config, action="merge")

    # ------------------------------------------------------------------- merging
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (undo with :meth:`unmerge_adapter`)."""
        adapter = self._adapters[self._require_active()]
        if not adapter.merged:
            self._merge_hook(adapter, "merge")

    def unmerge_adapter(self) -> None:
        """Take merged adapters back out of the base weights."""
        for adapter in self._adapters.values():
            if adapter.merged:
                self._merge_hook(adapter, "unmerge")

    def merge_and_unload(self) -> nn.Module:
        """Return the base model with the active adapter folded in and every adapter module removed."""
        self.merge_adapter()
        return self._unload_all()

    def unload(self) -> nn.Module:
        """Return the base model with every adapter removed and nothing merged."""
        self.unmerge_adapter()
        return self._unload_all()

    def _unload_all(self) -> nn.Module:
        hook = get_registry().hook
        for adapter in self._adapters.values():
            for param in adapter.parameters():
                param.requires_grad_(False)
        for adapter in self._adapters.values():
            hook.peftkit_merge(adapter=adapter, config=adapter.config, action="unload")
        unwrap_all(self.base_model, keep=self.active_adapter)
        for registry in (self._adapters, self.peft_config, self._specs, self._saved_modules):
            registry.clear()
        self.active_adapter = None
        return self.base_model

    def _merge_hook(self, adapter: Adapter, action: str) -> None:
        spec = self._specs[adapter.name]
        if not spec.mergeable:
            raise MergeError(f"method {spec.name!r} cannot merge its adapters into the base weights")
        get_registry().hook.peftkit_merge(adapter=adapter, config=adapter.config, action=action)

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` picks an adapter per batch row (``"__base__"`` for none).

        Methods receive ``rows``: adapter name to row indices, ``"__base__"`` included.
        """
        with self._call(kwargs, args, adapter_names, expand=1) as inputs:
            return self.base_model(*args, **inputs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` of the base model, with the active adapter or one adapter per row."""
        beams, returns = kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1
        with self._call(kwargs, args, adapter_names, expand=beams if beams > 1 else returns) as inputs:
            return cast(Any, self.base_model).generate(*args, **inputs)

    @contextmanager
    def _call(self, inputs: dict[str, Any], args: tuple[Any, ...], adapter_names: Sequence[str] | None, expand: int) -> Iterator[dict[str, Any]]:
        if adapter_names is None:
            active = self.active_adapter
            if active is None or not self._specs[active].rewrites_inputs:
                yield inputs
                return
            targets: list[str] = [active]
            rows = None
        else:
            targets, rows = self._rows(adapter_names, inputs, args, expand)
        hook = get_registry().hook
        wrappers = self._saved_wrappers()
        with ExitStack() as stack:
            if rows is not None:
                for wrapper in wrappers:
                    wrapper.rows = rows
                stack.callback(_clear_rows, wrappers)
            for name in targets:
                adapter = self._adapters[name]
                context = hook.peftkit_forward(adapter=adapter, config=adapter.config, inputs=inputs, rows=rows)
                if context is not None:
                    inputs = stack.enter_context(context)
            yield inputs

    def _saved_wrappers(self) -> list[ModulesToSaveWrapper]:
        """The modules_to_save wrappers of all adapters, found by name (walking the whole model costs milliseconds per call)."""
        names = dict.fromkeys(name for saved in self._saved_modules.values() for name in saved)
        found = (self.base_model.get_submodule(name) for name in names)
        return [module for module in found if isinstance(module, ModulesToSaveWrapper)]

    def _rows(self, names: Sequence[str], inputs: dict[str, Any], args: tuple[Any, ...], expand: int) -> tuple[list[str], dict[str, torch.Tensor]]:
        reference = next((t for t in (*args, *inputs.values()) if isinstance(t, torch.Tensor)), None)
        if reference is None:
            raise ValueError("adapter_names needs tensor inputs to know the batch size")
        if len(names) != reference.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {reference.shape[0]} rows")
        names = [n for n in names for _ in range(expand)]  # generate() repeats each row for beams / return sequences
        used = list(dict.fromkeys(n for n in names if n != BASE))
        for name in used:
            adapter = self._require(name)
            if not self._specs[name].mixed_batches:
                raise ValueError(f"method {self._specs[name].name!r} of adapter {name!r} does not support mixed batches")
            if adapter.merged:
                raise MergeError(f"adapter {name!r} is merged; unmerge_adapter() before a mixed batch")
        rows = {n: torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long, device=reference.device) for n in [*used, BASE]}
        return used, rows

    # ------------------------------------------------------------- parameters
    def _update_trainable(self) -> None:
        for adapter in self._adapters.values():  # all off first: adapters may share parameters (LoRA biases)
            for param in adapter.parameters():
                param.requires_grad_(False)
        active = self._adapters.get(self.active_adapter or "")
        if active is not None and not active.config.inference_mode:
            for param in active.parameters():
                param.requires_grad_(True)
        for wrapper in saved_wrappers(self.base_model).values():
            for name, copy in wrapper.modules_to_save.items():
                copy.requires_grad_(name == self.active_adapter and not self.peft_config[name].inference_mode)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting the base model's too."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            if hasattr(param, "quant_state") or type(param).__name__ == "Params4bit":
                count *= 2  # 4-bit weights pack two values per byte
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -------------------------------------------------------------- save/load
    def save_pretrained(self, save_directory: str | os.PathLike[str], selected_adapters: Sequence[str] | None = None) -> None:
        """Write each adapter in Hugging Face PEFT's format: "default" in the folder, others in sub-folders."""
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{root} exists and is not a directory")
        for name in selected_adapters or list(self._adapters):
            self._require(name)
            target = root if name == "default" else root / io.check_adapter_name(name)
            io.write_adapter(target, self._config_for_disk(name), self.adapter_state_dict(name))

    def _config_for_disk(self, name: str) -> dict[str, Any]:
        data = self.peft_config[name].to_dict()
        base_name = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
        if not data.get("base_model_name_or_path") and base_name:
            data["base_model_name_or_path"] = base_name
        return data

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys written to disk."""
        adapter = self._require(adapter_name)
        tensors = dict(get_registry().hook.peftkit_state_dict(adapter=adapter, config=adapter.config, tensors=None))
        prefix = self._specs[adapter_name].modules_to_save_prefix
        for module_name in self._saved_modules[adapter_name]:
            for key, value in self._saved_copy(module_name, adapter_name).state_dict().items():
                tensors[f"{prefix}{module_name}.{key}"] = value
        return tensors

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default", is_trainable: bool = False, revision: str | None = None, subfolder: str | None = None) -> PeftModel:
        """Load an adapter folder (local or a Hub repo id) onto ``model``."""
        config, tensors = _read_adapter(model_id, revision, subfolder, is_trainable)
        peft_model = _wrapper_class(type(model))(model, config, adapter_name)  # type: ignore[arg-type]
        try:
            peft_model._load_state(adapter_name, tensors)
        except Exception:
            peft_model.delete_adapter(adapter_name)  # unload() would keep the rejected modules_to_save copies
            raise
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False, revision: str | None = None, subfolder: str | None = None) -> None:
        """Load another adapter next to the existing ones; on any error the model is left as it was."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self._adapters:
            raise ConfigError(f"adapter {adapter_name!r} already exists; delete_adapter it or pick another name")
        config, tensors = _read_adapter(model_id, revision, subfolder, is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            self._load_state(adapter_name, tensors)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _load_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        adapter = self._adapters[adapter_name]
        remaining = dict(tensors)
        for module_name in self._saved_modules[adapter_name]:
            copy = self._saved_copy(module_name, adapter_name)
            prefix = f"{self._specs[adapter_name].modules_to_save_prefix}{module_name}."
            own = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
            expected = copy.state_dict()
            if set(own) != set(expected) or any(own[k].shape != v.shape for k, v in expected.items()):
                raise AdapterLoadError(f"saved module {module_name!r}: file has {sorted(own)} {[tuple(v.shape) for v in own.values()]}, model expects {[(k, tuple(v.shape)) for k, v in expected.items()]}")
            copy.load_state_dict(own)
        get_registry().hook.peftkit_state_dict(adapter=adapter, config=adapter.config, tensors=remaining)

    def _saved_copy(self, module_name: str, adapter_name: str) -> nn.Module:
        wrapper = cast(ModulesToSaveWrapper, self.base_model.get_submodule(module_name))
        return wrapper.modules_to_save[adapter_name]

    def _require(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; this model has {sorted(self._adapters)}")
        return self._adapters[name]

    def _require_active(self) -> str:
        if self.active_adapter is None:
            raise RuntimeError("this model has no active adapter; add one or call set_adapter")
        return self.active_adapter


def _clear_rows(wrappers: Any) -> None:
    for wrapper in wrappers:
        wrapper.rows = None


def _read_adapter(location: str | os.PathLike[str], revision: str | None, subfolder: str | None, is_trainable: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    directory = io.resolve_adapter_dir(location, revision, subfolder)
    config = config_from_dict(read_config_dict(directory / "adapter_config.json"))
    config.inference_mode = not is_trainable
    return config, io.read_tensors(directory)


@functools.cache
def _wrapper_class(base_class: type[nn.Module]) -> type[PeftModel]:
    """A PeftModel subclass whose ``forward`` shows the base class's signature.

    transformers.Trainer reads that signature to keep dataset columns and find
    label names, so the wrapper must look like the model it wraps.
    """
    try:
        signature = inspect.signature(base_class.forward)
    except (TypeError, ValueError):
        return PeftModel
    params = [p for p in signature.parameters.values() if p.name != "adapter_names"]
    keyword = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    position = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(position, keyword)
    params.sort(key=lambda p: p.kind)

    def forward(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        return PeftModel.forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    forward.__doc__ = PeftModel.forward.__doc__
    return type(f"PeftModelFor{base_class.__name__}", (PeftModel,), {"forward": forward, "__module__": __name__})


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new trainable adapter; the base weights are frozen."""
    return _wrapper_class(type(model))(model, config, adapter_name)  # type: ignore[arg-type]
