"""Where a QLoRA training step spends GPU time: torch profiler tables for PEFT and peftkit.

Uses the weights benchmarks/gpu_qlora.py writes (run it with --prepare-only first).

    python benchmarks/profile_qlora.py peft|peftkit|peftkit-plain|peftkit-compiled
    python benchmarks/profile_qlora.py host-costs   # host and GPU time of a quantized LoRA layer's ops, and of whole layers

``peftkit-plain`` runs peftkit with its quantized LoRA layers forced onto the
plain path (bitsandbytes' layer, then LoRA's modules), to compare with the
fused one. Prints the median time of 5 unprofiled steps, then the tables.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
import transformers as tf

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from gpu_qlora import CACHE, LLAMA_7B, LORA, write_random_llama


def host_costs() -> None:
    """Host and GPU microseconds per call of the ops in a quantized LoRA layer, then of whole layers (forward + backward).

    Host time: the loop without synchronisation (how fast Python can enqueue);
    with GPU: the same loop waited for. A step is host-bound where the first is
    the larger.
    """
    import bitsandbytes as bnb
    import peft

    import peftkit
    from peftkit_lora import LoraConfig
    from peftkit_lora.dropout import seeded_dropout
    from peftkit_qlora import dequant

    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
    weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
    a32 = torch.randn(16, 4096, device="cuda")
    ops = {
        "triton seeded dropout (1024 x 4096)": lambda: seeded_dropout(x, 0.05, 7),
        "torch native dropout": lambda: torch.nn.functional.dropout(x, 0.05),
        "bnb dequantize_4bit (11008 x 4096, nested)": lambda: bnb.functional.dequantize_4bit(weight.data, weight.quant_state),
        "peftkit dequant, 3 row slices": lambda: [d for _, d in dequant.dense_row_slices(weight.data, weight.quant_state, torch.bfloat16)],
        "peftkit dequant, 1 slice": lambda: [d for _, d in dequant.dense_row_slices(weight.data, weight.quant_state, torch.bfloat16, 2**30)],
        "cast fp32 -> bf16 (16 x 4096)": lambda: a32.to(torch.bfloat16),
        "cast + mm (1024 x 4096) @ (4096 x 16)": lambda: x @ a32.to(torch.bfloat16).T,
    }
    for name, op in ops.items():
        _time_calls(name, op, 500)

    def layer(library: str) -> torch.nn.Module:
        torch.manual_seed(0)
        base = bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        base.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        model = torch.nn.Sequential(base.cuda())
        options = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["0"]}
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**options)) if library == "peft" else peftkit.get_peft_model(model, LoraConfig(**options))
        return wrapped.train()

    inputs = x.clone().requires_grad_(True)
    grad = torch.randn(1024, 11008, device="cuda", dtype=torch.bfloat16)
    for library in ("peft", "peftkit"):
        model = layer(library)
        _time_calls(f"{library} layer forward + backward", lambda model=model: model(inputs).backward(grad), 50)
    original = dequant._kernel_for
    dequant._kernel_for = lambda packed, state: None  # bitsandbytes' dequantize_4bit, as before the kernel
    _time_calls("peftkit layer, bnb dequantize", lambda model=model: model(inputs).backward(grad), 50)
    dequant._kernel_for = original


def _time_calls(name: str, op: Any, calls: int) -> None:
    for _ in range(10):
        op()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        op()
    host = (time.perf_counter() - began) / calls * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - began) / calls * 1e6
    print(f"{name:>45}: host {host:7.1f} us/call, with GPU {total:7.1f} us/call")


def main() -> None:
    variant = sys.argv[1]
    if variant == "host-costs":
        return host_costs()
    folder = write_random_llama(CACHE / "llama2-7b-random", LLAMA_7B)
    quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0})
    if variant == "peft":
        import peft

        model = peft.get_peft_model(peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), peft.LoraConfig(**LORA))
    else:
        import peftkit
        from peftkit_lora import LoraConfig
        from peftkit_qlora import prepare_model_for_kbit_training

        model = peftkit.get_peft_model(prepare_model_for_kbit_training(model, compile_blocks=variant == "peftkit-compiled"), LoraConfig(**LORA))
        if variant == "peftkit-plain":
            from peftkit_lora.layers import LoraLayer
            from peftkit_qlora.layers import QuantLoraLinear

            for module in model.modules():
                if isinstance(module, QuantLoraLinear):
                    module.forward = LoraLayer.forward.__get__(module)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens = torch.randint(3, 32000, (1, 1024), device="cuda")

    def step() -> None:
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        began = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - began))
    print(f"== {variant}: median step {statistics.median(times):.0f} ms ({', '.join(f'{t:.0f}' for t in times)})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"== {variant}")
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
