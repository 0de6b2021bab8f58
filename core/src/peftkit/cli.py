"""The ``peftkit`` command line: ``methods``, ``inspect`` and ``merge``.

Rich tables when stdout is a terminal, plain text when piped, ``--json`` for
scripts. Errors from peftkit print one line to stderr and exit with status 1.
Importing this module does not import torch; only ``merge`` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from peftkit import io
from peftkit.config import CONFIG_NAME, read_config_dict
from peftkit.errors import AdapterLoadError, PeftkitError
from peftkit.plugins import get_registry

# The transformers Auto class that loads the base model, by the adapter's task_type.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
# Copied from a local base folder when transformers cannot load its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)
# Where the tensor part of a LoRA key starts (``q_proj.lora_A.weight``, ``q_proj.base_layer.bias``).
_TENSOR_PART = re.compile(r"^(lora_|base_layer$)")
_RANK_TENSOR = re.compile(r"^lora_(embedding_)?A(\.weight)?$")
_JSON_HELP = "Print machine-readable JSON."


class _Group(click.Group):
    """A click group that reports peftkit errors as one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftkitError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(package_name="peftkit")
def main() -> None:
    """peftkit: parameter-efficient fine-tuning with methods as plugins."""


# ------------------------------------------------------------------ methods
@main.command()
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
def methods(as_json: bool) -> None:
    """List installed methods and broken plugins.

    Each method shows its distribution, version and capabilities; a plugin that
    failed to import is listed with its error (PEFTKIT_STRICT_PLUGINS=1 makes that fatal).
    """
    registry = get_registry()
    data = {
        "methods": [
            {
                "name": spec.name,
                "peft_type": spec.peft_type,
                "distribution": spec.distribution,
                "version": spec.version,
                "capabilities": spec.capabilities(),
                "model_kinds": list(spec.model_kinds),
                "description": spec.description,
            }
            for spec in sorted(registry.methods.values(), key=lambda s: s.name)
        ],
        "broken": [dataclasses.asdict(plugin) for plugin in registry.broken],
    }
    if as_json:
        _print_json(data)
        return
    console = Console()
    if data["methods"]:
        rows = [
            (m["name"], m["peft_type"], m["distribution"], m["version"], ", ".join(m["capabilities"]), m["description"])
            for m in data["methods"]
        ]
        _table(console, "Installed methods", ("method", "peft_type", "distribution", "version", "capabilities", "description"), rows)
    else:
        hint = " (PEFTKIT_LOAD_PLUGINS is set)" if "PEFTKIT_LOAD_PLUGINS" in os.environ else ": pip install peftkit-lora"
        click.echo(f"No methods installed{hint}")
    if data["broken"]:
        broken = [(b["distribution"], b["entry_point"], b["error"]) for b in data["broken"]]
        _table(console, "Broken plugins", ("distribution", "entry point", "error"), broken)


# ------------------------------------------------------------------ inspect
@main.command("inspect")
@click.argument("location")
@click.option("--revision", help="Hub revision (branch, tag or commit) when LOCATION is a repo id.")
@click.option("--subfolder", help="Folder inside LOCATION that holds the adapter.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
def inspect_adapter(location: str, revision: str | None, subfolder: str | None, as_json: bool) -> None:
    """Show an adapter's config, tensors and size.

    LOCATION is an adapter folder or a Hub repo id. Only the JSON config and the
    safetensors header are read, so this is fast and needs no torch.
    """
    report = describe_adapter(io.resolve_adapter_dir(location, revision, subfolder))
    if as_json:
        _print_json(report)
        return
    console = Console()
    totals = report["totals"]
    _fields(console, "Adapter", [
        ("location", report["location"]),
        ("method", report["method"]),
        ("base model", report["base_model"] or "-"),
        ("task type", report["task_type"] or "-"),
        ("parameters", f"{totals['parameters']:,} in {totals['tensors']} tensors, {totals['modules']} modules"),
        ("dtypes", ", ".join(f"{dtype} ({count:,})" for dtype, count in report["dtypes"].items()) or "-"),
        ("size on disk", f"{_human_size(report['size_bytes'])} ({report['size_bytes']:,} bytes)"),
    ])
    _fields(console, "Config", [(key, json.dumps(value)) for key, value in report["config"].items()])
    rows = [
        (
            m["module"] or "(model)",
            "\n".join(f"{name} {shape}" for name, shape in m["tensors"].items()),
            "-" if m["rank"] is None else m["rank"],
            f"{m['parameters']:,}",
        )
        for m in report["modules"]
    ]
    _table(console, "Modules", ("module", "tensors", "rank", "parameters"), rows)


def describe_adapter(directory: Path) -> dict[str, Any]:
    """What ``inspect`` reports about an adapter folder, read from its JSON files alone (no torch)."""
    config = read_config_dict(directory / CONFIG_NAME)
    weights = directory / io.WEIGHTS_NAME
    header = io.read_safetensors_header(weights)
    modules: dict[str, dict[str, Any]] = {}
    dtypes: dict[str, int] = {}
    for key, info in sorted(header.items()):
        if key == "__metadata__":
            continue
        shape, dtype = info.get("shape"), info.get("dtype")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterLoadError(f"{weights} is corrupt: tensor {key!r} has no valid dtype and shape")
        module, tensor = split_key(key)
        row = modules.setdefault(module, {"module": module, "tensors": {}, "rank": None, "parameters": 0})
        row["tensors"][tensor] = shape
        row["parameters"] += math.prod(shape)
        if _RANK_TENSOR.match(tensor) and shape:
            row["rank"] = shape[0]
        dtypes[dtype] = dtypes.get(dtype, 0) + math.prod(shape)
    files = {path.name: path.stat().st_size for path in (directory / CONFIG_NAME, weights)}
    rows = list(modules.values())
    return {
        "location": str(directory),
        "method": config["peft_type"],
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "config": config,
        "modules": rows,
        "totals": {
            "modules": len(rows),
            "tensors": sum(len(row["tensors"]) for row in rows),
            "parameters": sum(row["parameters"] for row in rows),
        },
        "dtypes": dtypes,
        "files": files,
        "size_bytes": sum(files.values()),
    }


def split_key(key: str) -> tuple[str, str]:
    """Split a tensor key into (module, tensor name), dropping PEFT's ``base_model.model.`` or
    ``base_model.`` prefix (the latter: heads saved by prompt-learning methods).

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` gives
    ``("model.layers.0.self_attn.q_proj", "lora_A.weight")``; keys of other
    methods split off their last component (``("model.norm", "weight")``).
    """
    name = key.removeprefix(io.PEFT_PREFIX).removeprefix("base_model.")
    parts = name.split(".")
    start = next((i for i, part in enumerate(parts) if i and _TENSOR_PART.match(part)), len(parts) - 1)
    return ".".join(parts[:start]), ".".join(parts[start:])


# -------------------------------------------------------------------- merge
@main.command()
@click.argument("base")
@click.argument("adapter")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Write into OUT even when it is not empty.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
def merge(base: str, adapter: str, out: Path, force: bool, as_json: bool) -> None:
    """Merge an adapter into its base model and save the result.

    BASE is a transformers model folder or Hub id, ADAPTER an adapter folder or
    Hub id. The merged model (safetensors and config) and BASE's tokenizer are
    saved to OUT, which must be empty unless --force is given.
    """
    if out.is_dir() and any(out.iterdir()) and not force:
        raise click.ClickException(f"{out} is not empty; pass --force to write into it")
    adapter_dir = io.resolve_adapter_dir(adapter)
    config = read_config_dict(adapter_dir / CONFIG_NAME)
    auto_class = AUTO_CLASSES.get(config.get("task_type") or "", "AutoModel")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _steps(5) as step, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        step("Importing torch and transformers")
        import transformers

        from peftkit.model import PeftModel

        transformers.utils.logging.disable_progress_bar()  # the steps here are the progress display
        step(f"Loading base model {base} with {auto_class}")
        try:
            model = getattr(transformers, auto_class).from_pretrained(base)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot load base model {base!r} with {auto_class}: {_first_line(exc)}") from None
        step(f"Loading {config['peft_type']} adapter {adapter}")
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
        step("Merging the adapter into the base weights")
        merged = peft_model.merge_and_unload()
        step(f"Saving the merged model to {out}")
        staging = Path(tmp)
        cast(Any, merged).save_pretrained(staging)
        tokenizer = _save_tokenizer(base, staging)
        files = _publish(staging, out)
    result = {
        "out": str(out),
        "base": base,
        "adapter": adapter,
        "method": config["peft_type"],
        "auto_class": auto_class,
        "tokenizer": tokenizer,
        "files": files,
    }
    if as_json:
        _print_json(result)
        return
    _fields(Console(), "Merged", [(key.replace("_", " "), ", ".join(v) if isinstance(v, list) else v or "-") for key, v in result.items()])


def _save_tokenizer(base: str, directory: Path) -> str | None:
    """Save BASE's tokenizer next to the model: "saved", "copied" (its files), or None if it has none."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    except (OSError, ValueError, ImportError):  # none, or one transformers cannot load: copy its files
        found = [path for path in (Path(base) / name for name in TOKENIZER_FILES) if path.is_file()]
        for path in found:
            shutil.copy2(path, directory / path.name)
        return "copied" if found else None
    return "saved"


def _publish(staging: Path, out: Path) -> list[str]:
    """Move the files written in ``staging`` into ``out`` (replacing same-named ones); their names."""
    out.mkdir(exist_ok=True)
    names = sorted(path.name for path in staging.iterdir())
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    return names


# ------------------------------------------------------------------- output
def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Rows as a rich table on a terminal, as aligned plain text otherwise."""
    cells = [[str(value) for value in row] for row in rows]
    if console.is_terminal:
        table = Table(*columns, title=title, title_justify="left", title_style="bold")
        for row in cells:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return
    lines = [list(columns)] + [[cell.replace("\n", "; ") for cell in row] for row in cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    click.echo(f"{title}:")
    for line in lines:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    click.echo()


def _fields(console: Console, title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    """Key/value pairs as a rich grid on a terminal, ``key: value`` lines otherwise."""
    if console.is_terminal:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in pairs:
            grid.add_row(Text(key), Text(str(value)))
        console.print(Text(title, style="bold underline"))
        console.print(grid)
        console.print()
        return
    click.echo(f"{title}:")
    for key, value in pairs:
        click.echo(f"  {key}: {value}")
    click.echo()


@contextmanager
def _steps(total: int) -> Iterator[Callable[[str], None]]:
    """Report each step of a long command on stderr: a rich progress bar on a terminal, lines otherwise."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    done = 0
    if not console.is_terminal:

        def line(text: str) -> None:
            nonlocal done
            done += 1
            click.echo(f"[{done}/{total}] {text}", err=True)

        yield line
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=total)

        def advance(text: str) -> None:
            nonlocal done
            progress.update(task, completed=done, description=text)
            done += 1

        yield advance
        progress.update(task, completed=total, description="Done")


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


if __name__ == "__main__":
    main(prog_name="peftkit")
