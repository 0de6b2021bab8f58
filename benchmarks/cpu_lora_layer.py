"""Where a LoRA linear's CPU time goes: its arithmetic against the module and autograd around it.

For one linear layer at 1,024 tokens (the shapes of benchmarks/cpu_lora.py's
tiny Llama), forward and backward with an input gradient, float32, r=8,
dropout 0. The variants, timed in interleaved rounds:

- ``frozen, bare ops``: ``x W^T`` and ``g W`` as two matmuls, no autograd;
- ``LoRA math, bare ops``: the operations peftkit's fused path runs on the CPU
  (the weight merged in forward and again in backward, the rank-8 products in
  the same transposed forms), with no module and no autograd;
- ``frozen module``: ``nn.Linear`` with a frozen weight, through autograd (the
  floor of a training step);
- ``peftkit LoRA`` and ``HF PEFT LoRA``: the wrapped layer through autograd,
  LoRA parameters' gradients set to ``None`` before each step, as
  ``optimizer.zero_grad()`` does.

The bare rows' difference is what LoRA's arithmetic costs; the modules'
difference also counts Python, dispatch and autograd. Run from the repository root:

    python benchmarks/cpu_lora_layer.py      # writes benchmarks/results/cpu_lora_layer.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

import peftkit
from peftkit_lora import LoraConfig

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_lora_layer.md"
RANK, ALPHA = 8, 16


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def variants(tokens: int, d_in: int, d_out: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    frozen = OneLinear(d_in, d_out).requires_grad_(False)
    weight = frozen.proj.weight
    lora_a, lora_b = torch.randn(RANK, d_in) * 0.01, torch.randn(d_out, RANK) * 0.01
    bare_x, scaling = x.detach(), ALPHA / RANK

    def lora_math() -> object:
        a = lora_a * scaling
        out = bare_x @ torch.addmm(weight, lora_b, a).T
        h = (a @ bare_x.T).T
        grad_h = (lora_b.T @ g.T).T
        grad_b = (h.T @ g).T
        grad_x = g @ torch.addmm(weight, lora_b, a)
        grad_a = (grad_h.T @ bare_x) * scaling
        return out, grad_x, grad_a, grad_b

    def module_step(model: nn.Module) -> Callable[[], object]:
        trained = [p for p in model.parameters() if p.requires_grad]

        def step() -> object:
            for p in trained:
                p.grad = None
            x.grad = None
            model(x).backward(g)
            return x.grad

        return step

    peftkit_model = peftkit.get_peft_model(OneLinear(d_in, d_out), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    peft_model = peft.get_peft_model(OneLinear(d_in, d_out), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    return {
        "frozen, bare ops": lambda: (bare_x @ weight.T, g @ weight),
        "LoRA math, bare ops": lora_math,
        "frozen module": module_step(frozen),
        "peftkit LoRA": module_step(peftkit_model),
        "HF PEFT LoRA": module_step(peft_model),
    }


def time_interleaved(steps: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median microseconds per call of each step, over ``rounds`` interleaved rounds of ``calls`` calls."""
    for step in steps.values():
        for _ in range(20):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(calls):
                step()
            samples[name].append((time.perf_counter() - started) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="Time one LoRA linear's forward and backward on the CPU")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=50, help="calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    lines = [
        "# CPU: one LoRA linear, forward and backward",
        "",
        "- command: `python benchmarks/cpu_lora_layer.py`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- environment: torch {torch.__version__}, peft {peft.__version__}, torch threads {torch.get_num_threads()}",
        (
            f"- setup: {args.tokens} tokens, float32, r={RANK}, alpha {ALPHA}, dropout 0, input gradient on; "
            f"median of {args.rounds} interleaved rounds of {args.calls} calls"
        ),
        "",
        "| layer | frozen, bare ops | LoRA math, bare ops | frozen module | peftkit LoRA | HF PEFT LoRA | LoRA math over frozen | peftkit over frozen module |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d_in, d_out in ((256, 256), (256, 688), (688, 256)):
        us = time_interleaved(variants(args.tokens, d_in, d_out), args.calls, args.rounds)
        math_cost = us["LoRA math, bare ops"] - us["frozen, bare ops"]
        module_cost = us["peftkit LoRA"] - us["frozen module"]
        cells = " | ".join(f"{us[name]:.0f} us" for name in us)
        lines.append(f"| {d_in} -> {d_out} | {cells} | +{math_cost:.0f} us | +{module_cost:.0f} us |")
    text = "\n".join([*lines, ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
