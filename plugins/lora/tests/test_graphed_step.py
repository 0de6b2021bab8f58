"""GraphedTrainingStep: CUDA graph replays train as eager steps do, draw fresh dropout masks, and refuse what they cannot replay."""

from __future__ import annotations

import pytest
import torch
import transformers

import peftkit
from peftkit_lora import GraphedTrainingStep, LoraConfig
from peftkit_lora.dropout import seed_salt

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
VOCAB, SEQ = 128, 32


def lora_llama(device: str, dropout: float = 0.0, checkpointing: bool = False) -> torch.nn.Module:
    """A tiny float32 Llama with LoRA on every linear layer, B random so that the adapters (and their dropout) matter."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config).to(device)
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peftkit.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.train()


def batches(n: int, device: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (2, SEQ), generator=generator).to(device) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


def adamw(model: torch.nn.Module, lr: float | torch.Tensor = 1e-2, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, capturable=True, fused=fused)


def test_refuses_a_cpu_model_and_an_optimizer_it_cannot_capture() -> None:
    model = lora_llama("cpu")
    with pytest.raises(ValueError, match="one CUDA device, found cpu"):
        GraphedTrainingStep(model, adamw(model))
    params = [p for p in model.parameters() if p.requires_grad]
    for plain in (torch.optim.AdamW(params, lr=1e-3), torch.optim.AdamW(params, lr=1e-3, fused=True)):
        with pytest.raises(ValueError, match="capturable=True"):
            GraphedTrainingStep(model, plain)
    with pytest.raises(ValueError, match="warmup_steps must be at least 1"):
        GraphedTrainingStep(model, adamw(model), warmup_steps=0)
    with pytest.raises(ValueError, match="accumulation_steps must be at least 1"):
        GraphedTrainingStep(model, adamw(model), accumulation_steps=0)
    model.base_model.model.layers[0].mlp.compile()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is compiled with torch\.compile"):
        GraphedTrainingStep(model, adamw(model))


def train_eagerly(
    data: list[dict[str, torch.Tensor]], accumulation_steps: int = 1, max_grad_norm: float | None = None, fused: bool = False
) -> tuple[torch.nn.Module, list[float]]:
    """The reference GraphedTrainingStep must match: an eager loop, stepping (and clipping) every accumulation_steps batches."""
    model = lora_llama("cuda")
    optimizer = adamw(model, fused=fused)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for index, batch in enumerate(data):
        loss = model(**batch).loss
        (loss / accumulation_steps).backward()
        losses.append(loss.item())
        if (index + 1) % accumulation_steps == 0:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model, losses


def assert_trained_alike(graphed: torch.nn.Module, losses: list[float], eager: torch.nn.Module, eager_losses: list[float]) -> None:
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4, msg=name)


@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_replays_train_as_eager_steps_do(fused: bool) -> None:
    """Six steps on six batches: three eager warm-ups, the capture's replay, two more replays; the same as six eager steps."""
    data = batches(6, "cuda")
    eager, eager_losses = train_eagerly(data, fused=fused)
    graphed = lora_llama("cuda")
    step = GraphedTrainingStep(graphed, adamw(graphed, fused=fused), warmup_steps=3)
    losses = [step(batch).item() for batch in data]
    assert step._graph is not None, "steps 4 to 6 were replays"
    assert_trained_alike(graphed, losses, eager, eager_losses)


@needs_cuda
def test_accumulating_replays_train_as_eager_accumulation_does() -> None:
    """Two batches per clipped optimizer step: two eager steps, then a capture and replays; eight batches in all."""
    data = batches(8, "cuda")
    eager, eager_losses = train_eagerly(data, accumulation_steps=2, max_grad_norm=1.0)
    graphed = lora_llama("cuda")
    step = GraphedTrainingStep(graphed, adamw(graphed), warmup_steps=2, accumulation_steps=2, max_grad_norm=1.0)
    losses = [step(batch).item() for batch in data]
    assert step._graph is not None and step._update is not None, "the last four batches were replays"
    assert_trained_alike(graphed, losses, eager, eager_losses)


@needs_cuda
def test_each_replay_draws_new_masks_and_recomputation_draws_the_forwards() -> None:
    """With dropout, replays on one batch differ; with checkpointing, gradients equal those of the same masks without it."""
    batch = batches(1, "cuda")[0]
    grads = {}
    for checkpointing in (False, True):
        model = lora_llama("cuda", dropout=0.3, checkpointing=checkpointing)
        step = GraphedTrainingStep(model, adamw(model, lr=0.0), warmup_steps=1)
        step(batch)
        torch.manual_seed(123)  # the capture draws the masks' host seeds: the same for both models
        salt = seed_salt(torch.device("cuda", torch.cuda.current_device()))
        salt.zero_()
        first = step(batch).item()
        grads[checkpointing] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        second = step(batch).item()
        assert first != second, "a replay repeated the last replay's dropout masks"
        assert salt.item() == 2 << 32, "each replay advances the salt once"
    for plain, recomputed in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-5, rtol=1e-4)


@needs_cuda
def test_refuses_batches_models_and_learning_rates_the_graph_cannot_replay() -> None:
    model = lora_llama("cuda")
    optimizer = adamw(model)
    step = GraphedTrainingStep(model, optimizer, warmup_steps=1)
    batch = batches(1, "cuda")[0]
    step(batch)
    step(batch)
    longer = {k: torch.cat([v, v], dim=1) for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"pad every batch to one length"):
        step(longer)
    with pytest.raises(ValueError, match="the captured step read"):
        step({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="move the batch there first"):
        step({k: v.cpu() for k, v in batch.items()})
    model.eval()
    with pytest.raises(ValueError, match="captured in training mode"):
        step(batch)
    model.train()
    frozen = next(p for p in model.parameters() if p.requires_grad).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters changed since this GraphedTrainingStep was made"):
        step(batch)
    frozen.requires_grad_(True)
    optimizer.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match="tensor learning rate"):
        step(batch)


@needs_cuda
def test_a_tensor_learning_rate_follows_a_scheduler() -> None:
    model = lora_llama("cuda")
    optimizer = adamw(model, lr=torch.tensor(1e-2, device="cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step >= 3 else 1.0)
    step = GraphedTrainingStep(model, optimizer, warmup_steps=1, max_grad_norm=1.0)
    batch = batches(1, "cuda")[0]
    for _ in range(3):
        step(batch)
        scheduler.step()
    frozen = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    step(batch)  # learning rate 0 now: a replay that still used 1e-2 would move the weights
    for before, param in zip(frozen, (p for p in model.parameters() if p.requires_grad), strict=True):
        assert torch.equal(before, param)
