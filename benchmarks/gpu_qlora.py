"""QLoRA training memory and speed: peftkit (peftkit-qlora) against Hugging Face PEFT + bitsandbytes.

A Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 layers, 32
heads, vocabulary 32000) with random bf16 weights is written to disk once as
safetensors shards (cached under /tmp), then loaded 4-bit by transformers'
BitsAndBytesConfig (NF4, double quantization, bf16 compute) in a fresh
subprocess per variant. Each variant trains LoRA r=16 on all linear layers
(dropout 0.05) with gradient checkpointing, batch 1 x 1024 tokens and
torch.optim.AdamW, and reports the peak of torch.cuda.max_memory_allocated()
over the training steps (reset after loading) and the median step time over
the timed steps after the warm-up ones.

Variants: ``peft`` (peft.prepare_model_for_kbit_training + peft.get_peft_model),
``peftkit`` (peftkit_qlora.prepare_model_for_kbit_training + peftkit.get_peft_model),
``peft-fused-adamw`` / ``peftkit-fused-adamw`` (the same with ``AdamW(fused=True)``, what
transformers' Trainer uses by default), ``peftkit-adamw-in-backward`` (the same AdamW, stepped
bucket by bucket during backward by peftkit_qlora.OptimizerInBackward, so that the LoRA gradients
never all exist at once), ``peftkit-offload`` (each checkpointed block's input kept in pinned
host memory: ``offload_checkpoints=True``), ``peftkit-bf16-lora`` (the LoRA weights themselves in bf16),
``peftkit-whole-weight`` (each 4-bit weight rebuilt whole rather than in slices of at most
peftkit_qlora.dequant.SLICE_BYTES: fewer launches, a larger transient), ``peftkit-compiled``
(``compile_blocks=True``: each block's attention, MLP and norms compiled), ``peftkit-compiled-offload``
(both options; ``-adamw-in-backward``: and the optimizer stepped in backward; ``-fused-adamw-in-backward``:
fused AdamW in buckets of 64 parameters), ``peft-compiled-blocks`` (PEFT's model with the same regional compilation, for reference),
``peftkit-graphed`` (each step after the warm-up ones replayed as one CUDA graph by
peftkit_lora.GraphedTrainingStep, AdamW(capturable=True); the step that captures the graph is one more
warm-up step), ``peft-graphed`` (PEFT's model in the same graph, for reference).
Peaks are also given per phase of a step (forward, backward, optimizer step), and the peak of
torch.cuda.max_memory_reserved() over the timed steps: what the process holds, the graphs' memory pools included.

    python benchmarks/gpu_qlora.py --prepare-only  # first: write the random weights once (13.5 GB, a few minutes)
    python benchmarks/gpu_qlora.py                 # on a GPU: every variant, writes benchmarks/results/gpu_qlora.md
    python benchmarks/gpu_qlora.py --tiny          # a small model on the CPU, as a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHE = Path("/tmp/peftkit_bench")
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_qlora.md"
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
VARIANTS = (
    "peft",
    "peftkit",
    "peftkit-adamw-in-backward",
    "peft-fused-adamw",
    "peftkit-fused-adamw",
    "peftkit-offload",
    "peftkit-bf16-lora",
    "peftkit-whole-weight",
    "peftkit-compiled",
    "peftkit-compiled-offload",
    "peftkit-compiled-offload-adamw-in-backward",
    "peftkit-compiled-offload-fused-adamw-in-backward",
    "peft-compiled-blocks",
    "peftkit-graphed",
    "peft-graphed",
)
DEFAULT_VARIANTS = "peft,peftkit,peftkit-graphed,peftkit-compiled,peftkit-compiled-offload,peft-compiled-blocks,peft-graphed"
GIB = 2**30


def write_random_llama(folder: Path, shape: dict[str, int], seed: int = 0) -> Path:
    """Random bf16 Llama weights as one safetensors shard per block (host memory: one block at a time)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    if (folder / "DONE").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = tf.LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    hidden, inner, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    weight_map: dict[str, str] = {}
    total = 0

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(torch.bfloat16)

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": normal(vocab, hidden)})
    for i in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        block = {f"{prefix}self_attn.{p}_proj.weight": normal(hidden, hidden) for p in "qkvo"}
        block |= {f"{prefix}mlp.{p}_proj.weight": normal(inner, hidden) for p in ("gate", "up")}
        block[f"{prefix}mlp.down_proj.weight"] = normal(hidden, inner)
        block |= {
            f"{prefix}{n}.weight": torch.ones(hidden, dtype=torch.bfloat16)
            for n in ("input_layernorm", "post_attention_layernorm")
        }
        shard(f"block-{i:03d}.safetensors", block)
    shard(
        "head.safetensors",
        {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": normal(vocab, hidden)},
    )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "DONE").write_text("complete\n")
    return folder


def run_variant(variant: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load, prepare, train; runs in its own process so that GPU memory starts empty."""
    import torch
    import transformers as tf

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    quantization = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device_map = {"": device.index or 0} if cuda else {"": "cpu"}
    start = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.bfloat16, device_map=device_map
    )
    load_s = time.perf_counter() - start
    if variant.split("-")[0] == "peft":
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    else:
        import peftkit
        from peftkit_lora import LoraConfig
        from peftkit_qlora import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, offload_checkpoints="offload" in variant, compile_blocks="compiled" in variant
        )
        model = peftkit.get_peft_model(model, LoraConfig(**LORA))
        if variant == "peftkit-whole-weight":
            from peftkit_qlora import dequant

            dequant.SLICE_BYTES = 2**40
        if variant == "peftkit-bf16-lora":
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
    if variant == "peft-compiled-blocks":  # the same regional compilation as peftkit-compiled, on PEFT's model
        from peftkit_qlora.blocks import compile_blocks

        compile_blocks(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: Any
    if variant.endswith("fused-adamw-in-backward"):  # one fused AdamW kernel per bucket of about 4 blocks' LoRA weights
        from peftkit_qlora import OptimizerInBackward

        optimizer = OptimizerInBackward(params, torch.optim.AdamW, bucket_size=64, lr=2e-4, fused=True)
    elif variant.endswith("adamw-in-backward"):
        from peftkit_qlora import OptimizerInBackward

        optimizer = OptimizerInBackward(params, torch.optim.AdamW, lr=2e-4)
    elif variant.endswith("graphed"):
        optimizer = torch.optim.AdamW(params, lr=2e-4, capturable=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True if variant.endswith("fused-adamw") else None)
    vocab = model.config.vocab_size
    tokens = torch.randint(3, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": tokens, "labels": tokens, "use_cache": False}

    def eager_step() -> torch.Tensor:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    train_step: Any = eager_step
    if variant.endswith("graphed"):
        from peftkit_lora import GraphedTrainingStep

        train_step = functools.partial(GraphedTrainingStep(model, optimizer, warmup_steps=args.warmup), batch)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    setup_bytes = torch.cuda.memory_allocated(device) if cuda else 0
    times, losses = [], []
    warmup_peak = 0
    warmup = args.warmup + (1 if train_step is not eager_step else 0)  # the capture is a warm-up step too
    for index in range(warmup + args.steps):
        if index == warmup and cuda:  # from here the reserved peak: what the timed steps hold, graph pools included
            sync()
            warmup_peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        began = time.perf_counter()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    peak_bytes = max(warmup_peak, torch.cuda.max_memory_allocated(device)) if cuda else 0
    reserved_bytes = torch.cuda.max_memory_reserved(device) if cuda else 0
    phase_gib, backward_top = None, []
    if args.phases and cuda and train_step is eager_step:  # one more step, synchronizing between phases (not timed)
        phase_gib = {}

        def phase_done(phase: str) -> None:
            torch.cuda.synchronize(device)
            phase_gib[phase] = torch.cuda.max_memory_allocated(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)

        torch.cuda.reset_peak_memory_stats(device)
        from memory_peaks import backward_peaks, labelled_outputs

        with labelled_outputs(model) as labels:
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        phase_done("forward")
        with backward_peaks(loss, labels, device) as backward:
            loss.backward()
        phase_gib["backward"], backward_top = backward["peak_gib"], backward["top"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase_done("optimizer step")
    return {
        "variant": variant,
        "peak_gib": peak_bytes / GIB if cuda else None,
        "reserved_gib": reserved_bytes / GIB if cuda else None,
        "phase_gib": phase_gib,
        "backward_top": backward_top,
        "setup_gib": setup_bytes / GIB if cuda else None,
        "median_ms": 1000 * statistics.median(times[warmup:]),
        "trainable": sum(p.numel() for p in params),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "load_s": load_s,
        "checkpointing": bool(getattr(model.get_base_model(), "is_activation_checkpointing", False)),
        "embedding_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }


def _environment(device: str) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    gpu = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda") and torch.cuda.is_available()
        else platform.processor() or "CPU"
    )
    return (
        f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}"
    )


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, shape: dict[str, int]) -> str:
    base = next((r for r in rows if r["variant"] == "peft"), None)
    lines = [
        "# QLoRA training: peftkit vs Hugging Face PEFT",
        "",
        (
            f"Model: Llama shape {shape}, random bf16 weights loaded 4-bit (NF4, double quantization, bf16 compute) "
            f"by transformers' BitsAndBytesConfig. LoRA r=16, alpha 32, dropout 0.05, all linear layers; gradient "
            f"checkpointing; batch {args.batch} x {args.seq_len} tokens; torch.optim.AdamW (lr 2e-4; fused=True in the fused-adamw variants, capturable=True in the graphed ones). Peak = "
            f"torch.cuda.max_memory_allocated over the {args.warmup} warm-up (graphed variants: and the capture) + {args.steps} timed steps (reset "
            f"after loading); reserved = torch.cuda.max_memory_reserved over the timed steps (what the "
            f"process holds, cached blocks and CUDA graphs' memory pools included); step time = median of the timed "
            f"steps. One fresh process per variant."
        ),
        "",
        f"Environment: {_environment(args.device)}.",
        "",
        "peak by phase = the peak within the forward, backward and optimizer step of one extra (untimed) step.",
        "",
        (
            "| variant | peak GiB | median step ms | step time vs PEFT | reserved GiB (timed steps) | after-load GiB "
            "| peak by phase GiB | trainable params | embeddings | loss first -> last |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a (CPU)"
        setup = f"{row['setup_gib']:.2f}" if row["setup_gib"] is not None else "n/a"
        reserved = f"{row['reserved_gib']:.2f}" if row.get("reserved_gib") is not None else "n/a"
        ratio = f"{row['median_ms'] / base['median_ms']:.2f}x" if base else "-"
        phases = " / ".join(f"{k} {v:.2f}" for k, v in (row["phase_gib"] or {}).items()) or "-"
        lines.append(
            f"| {row['variant']} | {peak} | {row['median_ms']:.0f} | {ratio} | {reserved} | {setup} | {phases} | {row['trainable']:,} | "
            f"{row['embedding_dtype']} | {row['loss_first']:.3f} -> {row['loss_last']:.3f} |"
        )
    for row in rows:
        if row.get("backward_top"):
            lines += ["", f"Backward of `{row['variant']}`, largest peaks by autograd node (synchronised hooks):", ""]
            lines += [f"- {line}" for line in row["backward_top"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model, few steps: a smoke test that runs on the CPU"
    )
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--output", type=Path, default=None, help=f"markdown table (default {RESULTS}; --tiny: under {CACHE})"
    )
    parser.add_argument("--prepare-only", action="store_true", help="write the random weights and stop")
    parser.add_argument("--phases", action="store_true", help="also the peak of each phase (synchronizes between them)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA_7B
    args.seq_len = args.seq_len or (64 if args.tiny else 1024)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 10)
    folder = CACHE / ("llama-tiny-random" if args.tiny else "llama2-7b-random")
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, folder, args)), flush=True)
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"weights: {write_random_llama(folder, shape)}", flush=True)
    if args.prepare_only:
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if ("offload" in variant or "graphed" in variant) and args.device == "cpu":
            print(f"{variant:>18}: skipped (offloading activations to the host and CUDA graphs need a GPU)")
            continue
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--device",
            args.device,
            "--seq-len",
            str(args.seq_len),
            "--batch",
            str(args.batch),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            *(["--phases"] if args.phases else []),
        ]
        command += ["--tiny"] if args.tiny else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        results = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not results:
            sys.exit(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        rows.append(json.loads(results[-1]))
        row = rows[-1]
        peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "n/a"
        losses = f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}"
        print(f"{variant:>18}: peak {peak}, median step {row['median_ms']:.0f} ms, loss {losses}", flush=True)
    table = markdown(rows, args, shape)
    output = args.output or (CACHE / "gpu_qlora_tiny.md" if args.tiny else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    print(f"\n{table}\nwritten to {output}")


if __name__ == "__main__":
    main()
