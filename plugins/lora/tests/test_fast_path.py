"""The fused LoRA linear computes the plain path's function, and falls back where it does not apply."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig, kernels
from peftkit_lora.dropout import seeded_dropout
from peftkit_lora.kernels import LoraLinearFunction
from peftkit_lora.layers import LoraLayer, LoraLinear


def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bb: torch.Tensor, s: float, mask: torch.Tensor | None) -> torch.Tensor:
    lora_in = x if mask is None else x * mask
    return x @ w.T + b + s * (lora_in @ a.T) @ bb.T


def operands(dtype: torch.dtype = torch.float64, tokens: int = 3) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    x = torch.randn(2, tokens, 5, dtype=dtype, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=dtype), torch.randn(4, dtype=dtype)
    a = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    bb = torch.randn(4, 2, dtype=dtype, requires_grad=True)
    return x, w, b, a, bb


@pytest.mark.parametrize("tokens", [1, 3])
def test_gradcheck_against_float64(tokens: int) -> None:
    """Two tokens go through the low-rank products; six through a merged copy of the weight (without dropout)."""
    x, w, b, a, bb = operands(tokens=tokens)
    assert kernels._merges_in_training(x.reshape(-1, 5), w, 0.0) == (tokens == 3)
    assert torch.autograd.gradcheck(lambda x, a, bb: LoraLinearFunction.apply(x, w, b, a, bb, 0.7, 0.0, 0), (x, a, bb))
    fast = LoraLinearFunction.apply(x, w, b, a, bb, 0.7, 0.0, 0)
    reference = plain(x, w, b, a, bb, 0.7, None)
    torch.testing.assert_close(fast, reference)
    for got, want in zip(torch.autograd.grad(fast.pow(2).sum(), (x, a, bb)), torch.autograd.grad(reference.pow(2).sum(), (x, a, bb))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("input_grad", [True, False])
def test_training_keeps_the_merged_copy_only_for_an_input_gradient(input_grad: bool) -> None:
    """Backward takes the input gradient through the copy merged in forward, not one built again; with no
    input gradient to compute (a first layer fed by frozen embeddings) no copy outlives the forward."""
    x, w, b, a, bb = operands(tokens=3)
    x.requires_grad_(input_grad)
    out = LoraLinearFunction.apply(x, w, b, a, bb, 0.7, 0.0, 0)
    saved = out.grad_fn.saved_tensors
    merged = [t for t in saved if t is not None and t.shape == w.shape]
    assert len(merged) == 1
    if input_grad:
        torch.testing.assert_close(merged[0], w + 0.7 * bb @ a)
    else:
        assert merged[0] is w
    grads = torch.autograd.grad(out.pow(2).sum(), (x, a, bb) if input_grad else (a, bb))
    reference = plain(x, w, b, a, bb, 0.7, None)
    for got, want in zip(grads, torch.autograd.grad(reference.pow(2).sum(), (x, a, bb) if input_grad else (a, bb))):
        torch.testing.assert_close(got, want)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_float32_training_matches_float64_on_each_device(device: str, tokens: int) -> None:
    """Outputs and gradients in float32, through the low-rank products (2 tokens) or the kept merged copy (6), on
    the CPU's rank-first GEMMs with the scale as their alpha or on CUDA's plain ones."""
    reference = operands(tokens=tokens)
    ours = [t.detach().to(device, torch.float32).requires_grad_(t.requires_grad) for t in reference]
    x, w, b, a, bb = ours
    assert kernels._merges_in_training(x.reshape(-1, 5), w, 0.0) == (tokens == 3)
    out = LoraLinearFunction.apply(x, w, b, a, bb, 0.7, 0.0, 0)
    want = plain(*reference, 0.7, None)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, a, bb))
    wanted = torch.autograd.grad(want.pow(2).sum(), (reference[0], reference[3], reference[4]))
    for got, expected in zip(grads, wanted):
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-4)


def test_training_merges_only_without_dropout_and_an_unpacked_weight() -> None:
    x, w, _b, _a, _bb = operands(tokens=3)
    flat = x.reshape(-1, 5)
    assert kernels._merges_in_training(flat, w, 0.0)
    assert not kernels._merges_in_training(flat, w, 0.1), "dropout on the LoRA input alone cannot be merged"
    assert not kernels._merges_in_training(flat, None, 0.0), "a packed weight is never rebuilt whole"
    assert not kernels._merges_in_training(flat.bfloat16(), w.bfloat16(), 0.0), "bf16 would round s B A away"
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert not kernels._merges_in_training(flat.float(), w.float(), 0.0), "nor TF32"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert kernels._merges_in_training(flat.float(), w.float(), 0.0)


def test_dropout_matches_plain_path_with_the_same_mask() -> None:
    x, w, b, a, bb = operands()
    seed, p = 1234, 0.3
    fast = LoraLinearFunction.apply(x, w, b, a, bb, 0.7, p, seed)
    fast_grads = torch.autograd.grad(fast.pow(2).sum(), (x, a, bb))
    mask = seeded_dropout(torch.ones(6, 5, dtype=x.dtype), p, seed).view_as(x)
    reference = plain(x, w, b, a, bb, 0.7, mask)
    reference_grads = torch.autograd.grad(reference.pow(2).sum(), (x, a, bb))
    torch.testing.assert_close(fast, reference)
    for got, want in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got, want)
    # gradcheck with the mask fixed by the seed
    assert torch.autograd.gradcheck(lambda x, a, bb: LoraLinearFunction.apply(x, w, b, a, bb, 0.7, p, seed), (x, a, bb))


def test_dropout_has_the_expectation_of_no_dropout() -> None:
    x, w, b, a, bb = (t.detach() for t in operands())
    p = 0.5
    mean = torch.stack([LoraLinearFunction.apply(x, w, b, a, bb, 1.0, p, seed) for seed in range(4000)]).mean(0)
    torch.testing.assert_close(mean, plain(x, w, b, a, bb, 1.0, None), atol=0.15, rtol=0.05)


def lora_mlp(dropout: float = 0.0) -> tuple[peftkit.PeftModel, LoraLinear]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model = peftkit.get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False))
    return model, model.base_model[0]


def reference_output(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The module composition: what the fast path must equal."""
    return LoraLayer.forward(layer, x)


def test_module_fast_path_equals_composition_in_outputs_and_grads() -> None:
    _model, layer = lora_mlp()
    x = torch.randn(4, 8, requires_grad=True)
    assert layer._fast_path_operands(x, "default") is not None
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    fast = layer(x)
    fast_grads = torch.autograd.grad(fast.sum(), [x, *params])
    slow = reference_output(layer, x)
    slow_grads = torch.autograd.grad(slow.sum(), [x, *params])
    torch.testing.assert_close(fast, slow)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want)


def test_whole_model_training_step_matches_the_plain_path() -> None:
    def step(fast: bool) -> dict[str, torch.Tensor]:
        model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if not fast:
            for module in model.modules():
                if isinstance(module, LoraLinear):
                    module.forward = LoraLayer.forward.__get__(module)  # type: ignore[method-assign]
        model(**sample_inputs("llama", labels=True)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast, slow = step(True), step(False)
    assert fast.keys() == slow.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_long_batch_training_of_a_whole_model_equals_the_plain_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long batches train through merged copies of the weights (GPT-2's Conv1D ones transposed); loss and grads as plain."""
    ids = torch.randint(3, 64, (4, 32))
    merges = []
    build = kernels.merged_weight
    monkeypatch.setattr(kernels, "merged_weight", lambda *args: merges.append(1) or build(*args))

    def step(fast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = peftkit.get_peft_model(tiny_model(kind), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if not fast:
            for module in model.modules():
                if isinstance(module, LoraLinear):
                    module.forward = LoraLayer.forward.__get__(module)  # type: ignore[method-assign]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (fast_loss, fast), (slow_loss, slow) = step(True), step(False)
    adapted = sum(isinstance(m, LoraLinear) for m in peftkit.get_peft_model(tiny_model(kind), LoraConfig(target_modules="all-linear")).modules())
    assert len(merges) == adapted, "each adapted linear merges once, in forward; backward takes the kept copy"
    torch.testing.assert_close(fast_loss, slow_loss)
    assert fast.keys() == slow.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-4, msg=name)


class SubclassedLinear(nn.Linear):
    """Stands for a quantized or otherwise special base layer."""


@pytest.mark.parametrize("case", ["trainable-base", "hook", "accelerate-hook", "subclass", "autocast", "dtype"])
def test_falls_back_to_the_plain_path(case: str) -> None:
    _model, layer = lora_mlp()
    x = torch.randn(4, 8)
    seen = []
    if case == "trainable-base":
        layer.base_layer.weight.requires_grad_(True)
    elif case == "hook":
        layer.base_layer.register_forward_hook(lambda *args: seen.append(True))
    elif case == "accelerate-hook":  # accelerate wraps forward itself (e.g. to bring offloaded weights in)
        add_hook_to_module(layer.base_layer, ModelHook())
    elif case == "subclass":
        special = SubclassedLinear(8, 8).requires_grad_(False)
        special.load_state_dict(layer.base_layer.state_dict())
        layer.base_layer = special
    elif case == "dtype":  # LoRA weights in float64 on a float32 base
        layer.lora_A.to(torch.float64), layer.lora_B.to(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert layer._fast_path_operands(x, "default") is None
        out = layer(x)
        expected = reference_output(layer, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert seen or case != "hook", "the base layer's forward hook ran"


def test_torch_compile_has_no_graph_breaks_and_trains() -> None:
    model, _ = lora_mlp(dropout=0.1)
    x = torch.randn(4, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    model.eval()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x).sum().backward()
    assert model.base_model[0].lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("tokens", [2, 64])
def test_inference_equals_the_composition_whether_or_not_the_call_merges(tokens: int) -> None:
    """Without gradients, many tokens on CUDA take a merged copy of the weight for the call; few, the low-rank products."""
    _model, layer = lora_mlp()
    x = torch.randn(tokens, 8)
    weight_before = layer.base_layer.weight.clone()
    assert kernels._merging_moves_less(x, layer.base_layer.weight) == (tokens == 64)
    base, lora_a, lora_b = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_output(layer, x))
        merged = kernels._merged_forward(x, base.weight, base.bias, lora_a, lora_b, layer.scaling["default"])
        torch.testing.assert_close(merged, reference_output(layer, x))
    assert torch.equal(layer.base_layer.weight, weight_before), "the model's own weight stays unmerged"
    assert not layer.merged_adapters


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_long_batch_inference_of_a_whole_model_equals_the_plain_path(kind: str) -> None:
    """GPT-2's Conv1D stores its weight transposed: the per-call merge must build it the right way round."""
    model = peftkit.get_peft_model(tiny_model(kind), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 64, (4, 32))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.forward = LoraLayer.forward.__get__(module)  # type: ignore[method-assign]
        slow = model(input_ids=ids).logits
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_inference_cache_of_the_scaled_b_follows_weight_changes() -> None:
    _model, layer = lora_mlp()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_output(layer, x))
        layer.lora_B["default"].weight.add_(0.5)  # as an optimizer step or a load would
        torch.testing.assert_close(layer(x), reference_output(layer, x))
        layer.scaling["default"] *= 3
        torch.testing.assert_close(layer(x), reference_output(layer, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tokens", [16, 2048])
def test_inference_replays_as_a_cuda_graph_and_follows_in_place_weight_updates(tokens: int) -> None:
    """A captured no-grad forward (merged per call for 2048 tokens, low-rank products for 16) replays the eager
    result, and replays after the LoRA weights are updated in place give the updated model's result."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16)
    model = peftkit.get_peft_model(base, LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False)).eval()
    static = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static)  # warm-up: Triton compiles, the scaled-B cache fills
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = model(static)
        graph.replay()
        torch.testing.assert_close(replayed, eager)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(1.5)  # as loading new adapter weights in place would
        updated = model(static)
        graph.replay()
        assert not torch.equal(updated, eager)
        torch.testing.assert_close(replayed, updated)
