"""Adapter folders on disk and on the Hub: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading validates before trusting (JSON object, safetensors header within the
file, tensors that fit the adapter: :func:`check_tensors`); nothing is ever unpickled. Writing is atomic per file: a save that is
interrupted leaves the previous adapter in place.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.config import CONFIG_NAME
from peftkit.errors import AdapterLoadError, ConfigError

if TYPE_CHECKING:
    from torch import Tensor

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix for keys of layer methods
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_MAX_HEADER = 100_000_000


def check_adapter_name(name: str) -> str:
    """Reject adapter names that are not a plain folder name (they become sub-folders on save)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or name in (".", "..") or ".." in name:
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
            f"since non-default adapters are saved in a sub-folder of that name"
        )
    if name == "__base__":
        raise ConfigError("'__base__' is reserved for rows that use no adapter in a mixed batch")
    return name


def resolve_adapter_dir(location: str | os.PathLike[str], revision: str | None = None, subfolder: str | None = None) -> Path:
    """A local folder holding the adapter files, downloading them from the Hub if ``location`` is a repo id.

    Downloads go through huggingface_hub, so its cache and ``HF_HUB_OFFLINE`` apply.
    """
    path = Path(location)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    text = str(location)
    if path.exists() or not _HUB_ID.match(text):
        raise AdapterLoadError(f"{path} is not an adapter folder (it does not exist or is not a directory)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    files = {}
    try:
        for filename in (CONFIG_NAME, WEIGHTS_NAME):
            files[filename] = hf_hub_download(text, filename, revision=revision, subfolder=subfolder)
    except LocalEntryNotFoundError:
        raise AdapterLoadError(
            f"could not get {filename} of {text!r}: it is not in the Hub cache and the Hub is unreachable "
            f"(or HF_HUB_OFFLINE is set)"
        ) from None
    except EntryNotFoundError:
        hint = "; peftkit reads only safetensors adapters, never pickles" if filename == WEIGHTS_NAME else ""
        raise AdapterLoadError(f"Hub repo {text!r} has no {filename}{hint}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise AdapterLoadError(f"could not get {filename} of {text!r} from the Hub or its cache: {exc}") from None
    return Path(files[CONFIG_NAME]).parent


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The safetensors JSON header (tensor names, dtypes, shapes, offsets), checked against the file size.

    Needs no torch, so the CLI can inspect adapters quickly.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} not found: an adapter folder needs {WEIGHTS_NAME}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise AdapterLoadError(f"{path} is truncated: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, _MAX_HEADER):
            raise AdapterLoadError(f"{path} is truncated or not a safetensors file (header claims {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdapterLoadError(f"{path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise AdapterLoadError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the file")
    return header


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """Load ``adapter_model.safetensors`` from an adapter folder, with clear errors for bad files."""
    path = directory / WEIGHTS_NAME
    if not path.is_file() and (directory / PICKLE_WEIGHTS_NAME).is_file():
        raise AdapterLoadError(
            f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle, which peftkit never loads; "
            f"convert it to safetensors with a tool you trust"
        )
    read_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path} is corrupt: {exc}") from None


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str, hint: str) -> None:
    """Raise ``AdapterLoadError`` unless ``tensors`` has exactly the keys of ``expected``, each of the same shape.

    ``expected`` is usually the adapter's own ``state_dict()``. The message is
    "<what> does not fit this model (<problems>); <hint>", naming up to five
    missing keys, unexpected keys and shape mismatches each.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = [
        f"{label} {first_few(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if items
    ]
    if problems:
        raise AdapterLoadError(f"{what} does not fit this model ({'; '.join(problems)}); {hint}")


def first_few(items: Sequence[str], count: int = 5) -> str:
    """``items`` joined by commas, cut after ``count`` with "and N more", for error messages."""
    return ", ".join(items[:count]) + (f" and {len(items) - count} more" if len(items) > count else "")


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write an adapter folder: each file goes to a temporary name, then replaces the old one.

    Weights are written first and the config last, so a folder whose config is
    new also has new weights; an interrupted save leaves the old files intact.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(contiguous, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def _atomic_write(target: Path, write: Any) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; saved adapters get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
