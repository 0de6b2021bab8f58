"""CPU cost of a LoRA training step: the frozen base (the floor), Hugging Face PEFT and peftkit.

One training step is forward, backward and an AdamW step of a tiny Llama
(randomly initialised, causal-LM loss) on a fixed batch. The variants:

- ``frozen base``: every parameter frozen, gradients through the activations
  only (``inputs_embeds`` requires grad); no optimizer step, since nothing is
  trained. No LoRA method can be cheaper than this.
- ``HF PEFT LoRA``: ``peft.get_peft_model`` with LoRA r=8, all-linear.
- ``peftkit LoRA``: ``peftkit.get_peft_model`` with the same config.

Both LoRA variants use the same init (B = 0), alpha and dropout 0, and
``torch.optim.AdamW(fused=True)``, the optimizer transformers' Trainer uses by
default (torch's default AdamW on the CPU loops over the parameters in Python:
2.8 ms of a step here against 0.7 ms fused). Steps are
timed in interleaved rounds (so drift in machine load hits every variant
alike) after a warm-up; the table gives the median, and the median count of
minor page faults per step (memory the allocator handed back to the system
and touched again: 33,000 to 35,000 per step for every variant here, the floor's
included). torch's thread count is left as it is. Run from the repository root:

    python benchmarks/cpu_lora.py            # writes benchmarks/results/cpu_lora.md
    python benchmarks/cpu_lora.py --ablations --out benchmarks/results/cpu_lora_ablations.md

``--ablations`` adds two peftkit variants that split its cost over the floor:
one with the LoRA arithmetic skipped inside the fused function (what is left
is the module's code, the autograd function and the optimizer) and one that
trains through the low-rank products instead of per-call merged weights.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit_lora import LoraConfig

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_lora.md"


def tiny_llama(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.train()


def frozen_step(args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    model = tiny_llama(args)
    model.requires_grad_(False)
    ids = batch(args)
    embed = model.get_input_embeddings()

    def step() -> None:
        embeds = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()

    return step, 0


def lora_step(args: argparse.Namespace, make: Callable[[torch.nn.Module], torch.nn.Module]) -> tuple[Callable[[], None], int]:
    model = make(tiny_llama(args))
    ids = batch(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def hf_peft(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def peftkit_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return peftkit.get_peft_model(model, config)


def ablated_step(
    args: argparse.Namespace, switch: Callable[[], contextlib.AbstractContextManager[None]]
) -> tuple[Callable[[], None], int]:
    """A peftkit LoRA step run with part of the fast path switched off by ``switch`` (for ``--ablations``)."""
    step, trainable = lora_step(args, peftkit_lora)

    def ablated() -> None:
        with switch():
            step()

    return ablated, trainable


@contextlib.contextmanager
def without_lora_arithmetic() -> Iterator[None]:
    """Inside the fused autograd function only the base linear runs (LoRA gradients are zeros): what remains over the
    floor is the module's code, the autograd function's overhead and the optimizer."""
    from peftkit_lora import kernels

    forward, backward = kernels.lora_forward, kernels.lora_backward

    def base_forward(x, weight, bias, lora_a, lora_b, *_):  # type: ignore[no-untyped-def]
        return torch.nn.functional.linear(x, weight, bias), weight, lora_a, lora_b, lora_a, None

    def base_backward(grad_out, x, weight, a, b, h, keep, scaling, dropout_p, seed, slices, input_grad, dtypes):  # type: ignore[no-untyped-def]
        grad_x = (grad_out.reshape(-1, grad_out.shape[-1]) @ weight).view_as(x) if input_grad else None
        return grad_x, torch.zeros_like(a), torch.zeros_like(b)

    kernels.lora_forward, kernels.lora_backward = base_forward, base_backward
    try:
        yield
    finally:
        kernels.lora_forward, kernels.lora_backward = forward, backward


@contextlib.contextmanager
def without_merges() -> Iterator[None]:
    """Training through the low-rank products instead of a per-call merged copy of each weight."""
    from peftkit_lora import kernels

    merges = kernels._merges_in_training
    kernels._merges_in_training = lambda *_: False
    try:
        yield
    finally:
        kernels._merges_in_training = merges


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The tiny Llama's shape and the batch, as options (shared with benchmarks/cpu_lora_ab.py)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)


def batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description="Time a LoRA training step on the CPU")
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=120, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds the timed steps are split into")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file (default: benchmarks/results/cpu_lora.md)")
    parser.add_argument(
        "--ablations", action="store_true",
        help="also time peftkit with its LoRA arithmetic skipped, and without the per-call merge",
    )
    args = parser.parse_args()

    variants = {
        "frozen base (floor)": frozen_step(args),
        "HF PEFT LoRA": lora_step(args, hf_peft),
        "peftkit LoRA": lora_step(args, peftkit_lora),
    }
    if args.ablations:
        variants["peftkit, LoRA arithmetic skipped (module, autograd function, optimizer)"] = ablated_step(args, without_lora_arithmetic)
        variants["peftkit, no per-call merge (low-rank products)"] = ablated_step(args, without_merges)
    for step, _ in variants.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[int]] = {name: [] for name in variants}
    per_round = max(1, args.steps // args.rounds)
    while min(len(t) for t in times.values()) < args.steps:
        for name, (step, _) in variants.items():
            for _ in range(min(per_round, args.steps - len(times[name]))):
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                started = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - started) * 1000)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)

    floor = statistics.median(times["frozen base (floor)"])
    rows = []
    for name, (_, trainable) in variants.items():
        median = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4)
        page_faults = f"{statistics.median(faults[name]):,.0f}"
        rows.append((name, f"{trainable:,}", f"{median:.1f}", f"{q[0]:.1f}-{q[2]:.1f}", f"{median / floor:.3f}", page_faults))
    header = ("variant", "trainable params", "median ms/step", "IQR ms", "ratio to floor", "minor page faults/step")
    table = [
        "| " + " | ".join(header) + " |",
        "|---|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    peftkit_vs_peft = statistics.median(times["peftkit LoRA"]) / statistics.median(times["HF PEFT LoRA"])

    setup = (
        f"tiny Llama (random init): hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; causal-LM loss; "
        f"LoRA r=8, alpha 16, dropout 0, all-linear; {args.warmup} warm-up steps, median of {args.steps} "
        f"timed steps per variant in {args.rounds} interleaved rounds"
    )
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    environment = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"peftkit {peftkit.__version__}; Python {platform.python_version()}; {cpu_name()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    text = "\n".join(
        [
            "# CPU: LoRA training step",
            "",
            f"- command: `{command}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- environment: {environment}",
            f"- setup: {setup}",
            (
                "- step: forward + backward + AdamW step (fused=True, as transformers' Trainer; the floor has no trainable parameters, so no optimizer"
                " step; its gradients flow through the activations down to `inputs_embeds`)"
            ),
            "",
            *table,
            "",
            f"peftkit / HF PEFT: {peftkit_vs_peft:.2f}",
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
