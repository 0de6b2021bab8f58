"""GPU benchmark for fast LoRA (issue: training near the floor, unmerged inference near base speed).

One run measures every variant side by side, each in a fresh subprocess so peak
memory is its own: the frozen-base floor, full fine-tuning, Hugging Face PEFT
LoRA and peftkit LoRA (all-linear with dropout 0.05 and 0, q/v only), no-grad
forwards (base, unmerged, merged) and a batch mixing 4 adapters. It also checks
peftkit's bf16 fast path against a float64 reference and captures inference in
a CUDA graph. Variants ending in ``_graphed`` (training) or starting with
``graph_`` (forward) time the step replayed as a CUDA graph, GPU time without
the host's, against the floor or base replayed alike; ``_two_pass`` and
``_two_gemm`` switch off this round's fused dropout and per-call merge, for a
comparison in the same run. Training steps use ``torch.optim.AdamW(fused=True)``,
what transformers' Trainer uses by default (``optim="adamw_torch_fused"`` with
torch 2.8 or later); ``_foreach`` before ``_graphed`` takes torch's default
AdamW instead, as the runs before 2026-12-04 did. Results go to
benchmarks/results/gpu_lora.md.

Eager figures depend on the host, whose Python launches every kernel:
``--repeat N`` runs each variant in N interleaved processes and keeps its
fastest, and ``--profile DIR`` writes, per eager variant, when the host had
queued a step against when its GPU work was done, GPU time per kernel and a
cProfile of the host.

    python benchmarks/gpu_lora.py            # the 1.1B Llama shape of the issue
    python benchmarks/gpu_lora.py --tiny     # a smoke run (also on the CPU)
    python benchmarks/gpu_lora.py --variants fwd_base,mixed_peftkit --repeat 3 --profile prof
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRAIN_VARIANTS = {
    "floor": "all weights frozen, gradients through activations only",
    "full": "full fine-tuning",
    "peft_all_d05": "PEFT LoRA r=16 a=32 all-linear dropout 0.05",
    "peftkit_all_d05": "peftkit LoRA r=16 a=32 all-linear dropout 0.05",
    "peft_all_d0": "PEFT LoRA all-linear dropout 0",
    "peftkit_all_d0": "peftkit LoRA all-linear dropout 0",
    "peft_qv": "PEFT LoRA r=16 q_proj,v_proj",
    "peftkit_qv": "peftkit LoRA r=16 q_proj,v_proj",
    "peftkit_all_d05_two_pass": "peftkit all-linear dropout 0.05, dropout in separate passes (before 2026-11-23)",
    "floor_graphed": "floor, the step replayed as a CUDA graph (no host time)",
    "peftkit_all_d05_graphed": "peftkit all-linear dropout 0.05, CUDA graph",
    "peftkit_all_d05_two_pass_graphed": "peftkit all-linear dropout 0.05, separate dropout passes, CUDA graph",
    "peftkit_all_d0_graphed": "peftkit all-linear dropout 0, CUDA graph",
    "peftkit_qv_graphed": "peftkit q_proj,v_proj, CUDA graph",
    "peftkit_all_d05_foreach_graphed": "peftkit all-linear dropout 0.05, CUDA graph, foreach AdamW (before 2026-12-04)",
}
GRAPHED = "_graphed"  # the training step replayed as a CUDA graph
FOREACH = "_foreach"  # torch's default AdamW (one kernel per operation over lists of tensors), not the fused one
INFER_VARIANTS = {
    "fwd_base": "forward, no grad: base",
    "fwd_peft": "forward: PEFT unmerged LoRA",
    "fwd_peftkit": "forward: peftkit unmerged LoRA",
    "fwd_merged": "forward: peftkit merged",
    "mixed_peft": "forward: 4 adapters mixed by row, PEFT",
    "mixed_peftkit": "forward: 4 adapters mixed by row, peftkit",
    "graph_base": "forward: base, CUDA graph replay",
    "graph_peftkit": "forward: peftkit unmerged, CUDA graph replay",
    "fwd_peftkit_two_gemm": "forward: peftkit unmerged, low-rank products (no per-call merge, before 2026-11-23)",
}
# earlier forms of the fast path, for a comparison in the same run: the variant's suffix and what it switches off
EARLIER_FORMS = {
    "_two_pass": "dropped_products_apply",  # dropout drawn in its own passes over x, not inside the products
    "_two_gemm": "_merging_moves_less",  # no-grad forwards through the low-rank products, never a per-call merge
}


def model_config(tiny: bool):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def build(tiny: bool, device: str):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaForCausalLM

    config = model_config(tiny)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False)


def lora_config(kind: str, variant: str):  # type: ignore[no-untyped-def]
    targets = ["q_proj", "v_proj"] if variant.endswith("qv") else "all-linear"
    dropout = 0.05 if variant.endswith("d05") else 0.0
    options = {"r": 16, "lora_alpha": 32, "lora_dropout": dropout, "target_modules": targets}
    if kind == "peft":
        import peft

        return peft.LoraConfig(**options)
    from peftkit_lora import LoraConfig

    return LoraConfig(**options)


def wrap(model, variant: str):  # type: ignore[no-untyped-def]
    if variant.startswith("peftkit"):
        import peftkit

        return peftkit.get_peft_model(model, lora_config("peftkit", variant))
    if variant.startswith("peft"):
        import peft

        return peft.get_peft_model(model, lora_config("peft", variant))
    return model


def timed(step, warmup: int, steps: int, device: str) -> float:  # type: ignore[no-untyped-def]
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def run_train(
    variant: str, tiny: bool, device: str, graphed: bool = False, profile_file: Path | None = None, fused: bool = True
) -> dict[str, float]:
    """One training step's median time and peak memory; ``graphed``: the whole step replayed as a CUDA graph;
    ``fused``: AdamW's fused kernel (transformers' Trainer default), else torch's default (foreach) AdamW.

    With ``profile_file``, an eager variant also writes its GPU time per kernel there.
    """
    import torch

    batch, seq = (2, 64) if tiny else (8, 1024)
    model = wrap(build(tiny, device), variant)
    if variant == "full":
        model.requires_grad_(True)
    if variant == "floor":
        embed = model.get_input_embeddings()
        embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kernels = {"fused": True} if fused else {"foreach": True}  # fused=False alone would loop over the tensors one by one
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=graphed, **kernels) if params else None
    ids = torch.randint(0, model_config(tiny).vocab_size, (batch, seq), device=device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = timed(captured(step) if graphed and device == "cuda" else step, 3, 12, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    if profile_file is not None and not graphed and device == "cuda":
        profile_kernels(step, profile_file)
    return {"ms": ms, "peak_gib": peak}


def profile_kernels(step, path: Path) -> None:  # type: ignore[no-untyped-def]
    """GPU time over two steps (after the timed ones), summed by kernel name, then by the operator (and its input
    shapes) that launched it: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_step_ms = 1000 * steps  # the profiler counts microseconds over all the steps
    kernels = [  # a range such as the optimizer's step also shows on the GPU's timeline: left out, its kernels are counted
        e for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0 and not e.is_user_annotation
    ]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels)
    lines = [f"{total / per_step_ms:.1f} ms of kernels per step; per kernel name: ms per step, calls per step, share"]
    for e in kernels[:40]:
        share = 100 * e.device_time_total / total
        lines.append(f"{e.device_time_total / per_step_ms:8.2f} ms {e.count // steps:6d}  {share:5.1f}%  {e.key[:150]}")
    operators = [e for e in prof.key_averages(group_by_input_shape=True) if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    operators.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines += ["", "per operator and input shapes: GPU ms per step of the kernels it launched itself, calls per step"]
    for e in operators[:40]:
        lines.append(f"{e.self_device_time_total / per_step_ms:8.2f} ms {e.count // steps:6d}  {e.key} {e.input_shapes}"[:220])
    path.write_text("\n".join([host_time(step), *lines, "", host_profile(step)]) + "\n")


def host_profile(step) -> str:  # type: ignore[no-untyped-def]
    """The host's time per step by Python function and torch call (cProfile over 5 steps, by own time): where the host goes."""
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    return "host time over 5 steps (cProfile, own time first):\n" + text.getvalue()


def host_time(step) -> str:  # type: ignore[no-untyped-def]
    """When ``step()`` returns (the host has queued its work) and when its GPU work is done, medians of 10 steps:
    close figures mean the host, not the GPU, sets the pace."""
    import torch

    queued, done = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        queued.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - start)
    return f"host queued the step in {1000 * statistics.median(queued):.1f} ms; its GPU work done at {1000 * statistics.median(done):.1f} ms"


def captured(step):  # type: ignore[no-untyped-def]
    """``step`` recorded once as a CUDA graph (after warm-up on a side stream): its replay, free of host time."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def add_mixed_adapters(model, kind: str):  # type: ignore[no-untyped-def]
    """Four adapters with random (non-zero) B, so every row does real LoRA work."""
    import torch

    names = ["a0", "a1", "a2", "a3"]
    for name in names:
        if kind == "peft":
            import peft

            config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        else:
            from peftkit_lora import LoraConfig

            config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        model.add_adapter(name, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.01)
    return names


def run_infer(variant: str, tiny: bool, device: str, profile_file: Path | None = None) -> dict[str, float]:
    """One no-grad forward's median time; with ``profile_file``, an eager variant also writes its GPU time per kernel there."""
    import torch

    batch, seq = (2, 32) if tiny else (8, 512)
    base = build(tiny, device).eval()
    ids = torch.randint(0, model_config(tiny).vocab_size, (batch, seq), device=device)
    kind = "peftkit" if "peftkit" in variant or variant == "fwd_merged" else "peft"
    model = base if variant in ("fwd_base", "graph_base") else wrap(base, f"{kind}_all_d0")
    extra: dict[str, object] = {}
    if variant == "fwd_merged":
        model = model.merge_and_unload()
    if variant.startswith("mixed"):
        names = add_mixed_adapters(model, kind)
        extra["adapter_names"] = [names[i % 4] for i in range(batch)]
    model.eval()
    if variant.startswith("graph") and device == "cuda":
        static = ids.clone()
        with torch.no_grad():
            eager = model(input_ids=static, use_cache=False).logits
            holder: list[torch.Tensor] = []
            replay = captured(lambda: holder.append(model(input_ids=static, use_cache=False).logits))
        replay()
        torch.cuda.synchronize()
        error = ((holder[-1].float() - eager.float()).norm() / eager.float().norm()).item()
        return {"ms": timed(replay, 3, 20, device), "graph_rel_error": error}

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, **extra)

    ms = timed(step, 3, 20, device)
    if profile_file is not None and device == "cuda":
        profile_kernels(step, profile_file)
    return {"ms": ms}


def run_check(tiny: bool, device: str) -> dict[str, float]:
    """bf16 fast path and plain path against a float64 reference of the same LoRA linear."""
    import torch
    from torch import nn

    import peftkit
    from peftkit_lora import LoraConfig
    from peftkit_lora.layers import LoraLayer

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(2048, 2048)).to(device, torch.bfloat16)
    model = peftkit.get_peft_model(layer, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], init_lora_weights=False))
    lora = model.base_model[0]
    x = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    params = [x, lora.lora_A["default"].weight, lora.lora_B["default"].weight]

    def result(fn):  # type: ignore[no-untyped-def]
        out = fn()
        grads = torch.autograd.grad(out.float().pow(2).mean(), params)
        return [out, *grads]

    fast = result(lambda: lora(x))
    plain = result(lambda: LoraLayer.forward(lora, x))
    lora.double()
    x64 = x.detach().double().requires_grad_(True)
    params = [x64, lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    reference = result(lambda: LoraLayer.forward(lora, x64))

    def rel(a, b):  # type: ignore[no-untyped-def]
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {
        "fast_vs_fp64_max_rel": max(rel(a, b) for a, b in zip(fast, reference)),
        "plain_vs_fp64_max_rel": max(rel(a, b) for a, b in zip(plain, reference)),
        **dropout_check(device),
    }


def dropout_check(device: str) -> dict[str, float]:
    """The seeded-dropout fast path (Triton on CUDA) against float64 with the same mask."""
    import torch

    from peftkit_lora.dropout import seeded_dropout
    from peftkit_lora.kernels import LoraLinearFunction

    torch.manual_seed(1)
    p, seed, scaling = 0.1, 7, 2.0
    x = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(2048, 2048, device=device) * 0.02).to(torch.bfloat16)
    a = (torch.randn(16, 2048, device=device) * 0.02).to(torch.bfloat16).requires_grad_(True)
    b = (torch.randn(2048, 16, device=device) * 0.02).to(torch.bfloat16).requires_grad_(True)
    out = LoraLinearFunction.apply(x, w, None, a, b, scaling, p, seed)
    grads = torch.autograd.grad(out.float().pow(2).mean(), [x, a, b])
    mask = seeded_dropout(torch.ones_like(x), p, seed).double()
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    ref = x64 @ w.double().T + scaling * ((x64 * mask) @ a64.T) @ b64.T
    ref_grads = torch.autograd.grad(ref.pow(2).mean(), [x64, a64, b64])
    errors = [((g.double() - r).norm() / r.norm()).item() for g, r in zip([out, *grads], [ref, *ref_grads])]
    other = seeded_dropout(torch.ones_like(x), p, seed + 1)
    big = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    copy_ms = timed(lambda: big.clone(), 5, 50, device)
    dropout_ms = timed(lambda: seeded_dropout(big, p, seed), 5, 50, device)
    return {
        "dropout_8192x4096_us": 1000 * dropout_ms,
        "copy_8192x4096_us": 1000 * copy_ms,
        "dropout_fast_vs_fp64_max_rel": max(errors),
        "dropout_keep_fraction": (mask != 0).double().mean().item(),
        "dropout_masks_differ_by_seed": float(not torch.equal(mask != 0, other != 0)),
    }


def child(variant: str, tiny: bool, device: str, profile_dir: str | None = None) -> None:
    profile_file = None if profile_dir is None else Path(profile_dir) / f"{variant}.txt"  # the full name: suffixes are stripped below
    graphed = variant.endswith(GRAPHED)
    variant = variant.removesuffix(GRAPHED)
    fused = not variant.endswith(FOREACH)
    variant = variant.removesuffix(FOREACH)
    for suffix, switch in EARLIER_FORMS.items():
        if variant.endswith(suffix):
            from peftkit_lora import kernels

            setattr(kernels, switch, lambda *args: False)
            variant = variant.removesuffix(suffix)
    if variant == "check":
        result = run_check(tiny, device)
    elif variant in TRAIN_VARIANTS:
        result = run_train(variant, tiny, device, graphed, profile_file, fused)
    else:
        result = run_infer(variant, tiny, device, profile_file)
    print("RESULT " + json.dumps(result))


def parent(args: argparse.Namespace) -> None:
    """Each chosen variant in its own process, in ``--repeat`` interleaved rounds; a variant keeps its fastest round.

    A process's median is steady, but processes differ (on some leases one in several ran its host-bound steps up to
    twice as slow): the lowest of a few, applied to every variant alike, filters that out. All rounds' figures are kept
    under ``ms_runs``.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, dict[str, Any]] = json.loads(Path(args.merge).read_text()) if args.merge else {}
    chosen = args.variants.split(",") if args.variants else ["check", *TRAIN_VARIANTS, *INFER_VARIANTS]
    for round_number in range(args.repeat):
        for variant in chosen:
            result = run_child(variant, device, args)
            earlier = results.get(variant, {}) if round_number else {}
            if result is None:
                results[variant] = earlier or {"error": 1.0}
                continue
            if "ms" in result:  # timed: the fastest round stands, every round is listed
                best = earlier if earlier.get("ms", math.inf) <= result["ms"] else result
                result = {**best, "ms_runs": [*earlier.get("ms_runs", []), result["ms"]]}
            results[variant] = result
            print(variant, results[variant], flush=True)
            write(results, device, args)  # after every variant: a run stopped at a time limit keeps what it measured
    print(render(results, device, args.tiny))


def run_child(variant: str, device: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """One variant measured in a fresh process (so peak memory is its own); ``None`` where it failed."""
    command = [sys.executable, __file__, "--variant", variant, "--device", device] + (["--tiny"] if args.tiny else [])
    command += ["--profile", args.profile] if args.profile else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def write(results: dict[str, dict[str, Any]], device: str, args: argparse.Namespace) -> None:
    if not args.tiny:
        Path(args.out).write_text(render(results, device, args.tiny))
    Path(args.json_out).write_text(json.dumps(results, indent=2))


def render(results: dict[str, dict[str, Any]], device: str, tiny: bool) -> str:
    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    floor = results.get("floor", {})
    base = results.get("fwd_base", {})
    lines = [
        "# GPU LoRA benchmark",
        "",
        (f"`python benchmarks/gpu_lora.py{' --tiny' if tiny else ''}` on {name}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, {time.strftime('%Y-%m-%d')}."),
        ("Llama shape: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000, bf16, sdpa. "
        "Training: batch 8 x 1024, labels = inputs, AdamW (fused, as transformers' Trainer), median of 12 steps after 3 warm-up. "
        "Forward: batch 8 x 512, no grad, median of 20."),
        "",
        "| variant | ms | x floor (graphed: x graphed floor) | peak GiB | x floor peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in TRAIN_VARIANTS.items():
        r = results.get(key, {})
        if "ms" not in r:
            lines.append(f"| {label} | failed | | | |")
            continue
        own_floor = results.get("floor_graphed", {}) if key.endswith(GRAPHED) else floor
        ratio = r["ms"] / own_floor["ms"] if own_floor.get("ms") else float("nan")
        peak = r.get("peak_gib", 0.0)
        peak_ratio = peak / own_floor["peak_gib"] if own_floor.get("peak_gib") else float("nan")
        lines.append(f"| {label} | {r['ms']:.1f} | {ratio:.2f} | {peak:.1f} | {peak_ratio:.2f} |")
    lines += ["", "| forward variant | ms | x base (graph replay: x base replay) |", "|---|---:|---:|"]
    for key, label in INFER_VARIANTS.items():
        r = results.get(key, {})
        if "ms" not in r:
            lines.append(f"| {label} | failed | |")
            continue
        own_base = results.get("graph_base", {}) if key.startswith("graph") else base
        ratio = r["ms"] / own_base["ms"] if own_base.get("ms") else float("nan")
        lines.append(f"| {label} | {r['ms']:.1f} | {ratio:.2f} |")
    check = results.get("check", {})
    lines += [
        "",
        (f"bf16 check, relative error to a float64 reference (outputs and grads, worst): fast path {check.get('fast_vs_fp64_max_rel', float('nan')):.2e}, "
        f"plain path {check.get('plain_vs_fp64_max_rel', float('nan')):.2e}; with dropout 0.1 (seeded mask) {check.get('dropout_fast_vs_fp64_max_rel', float('nan')):.2e}, "
        f"kept fraction {check.get('dropout_keep_fraction', float('nan')):.4f}."),
        (f"Seeded dropout of an 8192 x 4096 bf16 tensor: {check.get('dropout_8192x4096_us', float('nan')):.0f} us "
        f"(a plain copy of it: {check.get('copy_8192x4096_us', float('nan')):.0f} us)."),
    ]
    if "graph_rel_error" in results.get("graph_peftkit", {}):
        lines.append(f"CUDA graph replay vs eager, relative error: {results['graph_peftkit']['graph_rel_error']:.2e}.")
    repeated = {key: r["ms_runs"] for key, r in results.items() if len(r.get("ms_runs", [])) > 1}
    if repeated:
        runs = "; ".join(f"{key} " + " / ".join(f"{ms:.1f}" for ms in times) for key, times in repeated.items())
        lines.append(f"Repeated variants show their fastest process (`--repeat`); every process's median, in ms: {runs}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, for a smoke run")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_lora.md"))
    parser.add_argument("--json-out", default="gpu_lora.json")
    parser.add_argument("--variants", help="comma-separated subset to run (default: all; the table lists the rest as failed)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; each variant keeps its fastest (default 1)")
    parser.add_argument("--merge", metavar="JSON", help="start from an earlier run's --json-out (variants run now replace its)")
    parser.add_argument("--profile", metavar="DIR", help="also write each eager variant's GPU time per kernel to DIR/VARIANT.txt")
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args.tiny, args.device, args.profile)
    else:
        parent(args)


if __name__ == "__main__":
    main()
