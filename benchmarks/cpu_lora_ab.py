"""Paired CPU A/B of the fused LoRA kernels: an earlier revision's ``kernels.py`` against the working tree's.

Differences of a millisecond in a 140 ms step drown in the drift between
processes and runs, so both versions run in one process, on two copies of the
tiny Llama of ``benchmarks/cpu_lora.py``, with the frozen-base floor: each
round runs one step of each in shuffled order, and the table gives each
version's median step and the median of its per-round difference to the floor
(the pairing cancels the machine's drift). The earlier version is loaded from
git (``git show REV:plugins/lora/src/peftkit_lora/kernels.py``) and swapped in
for the layers' ``lora_linear`` during its steps; it must import against the
working tree's other plugin modules. Run from the repository root:

    python benchmarks/cpu_lora_ab.py --before 7ad283e --out benchmarks/results/cpu_lora_ab.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cpu_lora
import torch

import peftkit_lora.layers

KERNELS = "plugins/lora/src/peftkit_lora/kernels.py"


def kernels_at(revision: str) -> object:
    """``kernels.py`` as of ``revision``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:{KERNELS}"], check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "kernels_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("kernels_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description="Paired CPU A/B of an earlier kernels.py against the working tree's")
    parser.add_argument("--before", required=True, help="git revision of the earlier kernels.py")
    parser.add_argument("--rounds", type=int, default=150, help="rounds of one step per variant (default 150)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    cpu_lora.add_model_arguments(parser)
    args = parser.parse_args()

    before = kernels_at(args.before)
    current = peftkit_lora.layers.lora_linear

    @contextlib.contextmanager
    def earlier_kernels() -> Iterator[None]:
        peftkit_lora.layers.lora_linear = before.lora_linear  # type: ignore[attr-defined]
        try:
            yield
        finally:
            peftkit_lora.layers.lora_linear = current

    variants = {
        "frozen base (floor)": cpu_lora.frozen_step(args)[0],
        f"peftkit, kernels.py of {args.before}": cpu_lora.ablated_step(args, earlier_kernels)[0],
        "peftkit, working tree": cpu_lora.lora_step(args, cpu_lora.peftkit_lora)[0],
    }
    for step in variants.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            started = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - started) * 1000)

    floor_times = times["frozen base (floor)"]
    floor = statistics.median(floor_times)
    lines = [
        "# CPU: paired A/B of the fused LoRA kernels",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}, torch threads {torch.get_num_threads()}",
        f"- {args.rounds} rounds of one training step per variant in shuffled order; tiny Llama and LoRA as in benchmarks/cpu_lora.py",
        "",
        "| variant | median ms/step | ratio to floor | median paired difference to the floor, ms |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        paired = statistics.median(value - base for value, base in zip(values, floor_times))
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / floor:.3f} | {paired:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
