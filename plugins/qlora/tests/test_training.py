"""Training over a quantized base: preparation without upcasts, paged optimizers, transformers.Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers as tf
from conftest import loaded_in_4bit, quantized, train, trainable
from torch.utils.data import Dataset

import peftkit
from peftkit import PeftkitError
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig
from peftkit_qlora import QLoraConfig, prepare_model_for_kbit_training, quantize_model


def bf16_quantized() -> torch.nn.Module:
    return quantize_model(tiny_model("llama").to(torch.bfloat16))


def lora(model: torch.nn.Module) -> peftkit.PeftModel:
    torch.manual_seed(1)
    return peftkit.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))


def test_prepare_keeps_large_weights_in_their_dtype_and_training_works() -> None:
    base = prepare_model_for_kbit_training(bf16_quantized())
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16, "bf16 has fp32's range: norms stay bf16"
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers 4.x name
        checkpointing = base.is_gradient_checkpointing
    assert checkpointing and base.config.use_cache is False
    frozen = [(p, p.detach().clone()) for p in base.parameters()]

    model = lora(base)
    losses = train(model, torch.optim.AdamW(trainable(model), lr=1e-2))

    assert losses[-1] < losses[0], f"the loss went down: {losses}"
    assert all(torch.equal(p, copy) for p, copy in frozen), "the base did not change"
    assert {p.dtype for p in trainable(model)} == {torch.float32}, "LoRA master weights stay float32"
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16


def test_peft_prepare_upcasts_what_ours_keeps() -> None:
    ours = prepare_model_for_kbit_training(bf16_quantized())
    theirs = peft.prepare_model_for_kbit_training(bf16_quantized())
    assert theirs.lm_head.weight.dtype == torch.float32 and theirs.model.embed_tokens.weight.dtype == torch.float32

    def dense_bytes(model: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))

    large = ours.lm_head.weight.numel() + ours.model.embed_tokens.weight.numel()
    assert dense_bytes(theirs) - dense_bytes(ours) >= 2 * large, "PEFT pays 2 more bytes per embedding/head value"


def test_fp16_norms_move_to_fp32_but_activations_keep_fp16() -> None:
    base = prepare_model_for_kbit_training(quantize_model(tiny_model("llama").to(torch.float16)))
    assert base.model.norm.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float16 and base.lm_head.weight.dtype == torch.float16
    hidden = base.model.norm(torch.randn(1, 2, 16, dtype=torch.float16))
    assert hidden.dtype == torch.float16, "the norm's output keeps the residual stream's dtype"
    model = lora(base)
    loss = model(**sample_inputs("llama", labels=True)).loss
    loss.backward()
    assert all(p.grad is not None for p in trainable(model))


def test_reentrant_checkpointing_gets_input_gradients() -> None:
    model = lora(
        prepare_model_for_kbit_training(quantized("llama"), gradient_checkpointing_kwargs={"use_reentrant": True})
    )
    model.train()
    model(**sample_inputs("llama", labels=True)).loss.backward()
    assert all(p.grad is not None for p in trainable(model)), "gradients reach LoRA through reentrant checkpoints"


def test_clear_errors() -> None:
    with pytest.raises(PeftkitError, match="use_gradient_checkpointing=False"):
        prepare_model_for_kbit_training(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    prepare_model_for_kbit_training(torch.nn.Sequential(torch.nn.Linear(4, 4)), use_gradient_checkpointing=False)
    with pytest.raises(PeftkitError, match="before get_peft_model"):
        prepare_model_for_kbit_training(lora(quantized("llama")))
    if not torch.cuda.is_available():
        with pytest.raises(PeftkitError, match="no GPU"):
            prepare_model_for_kbit_training(quantized("llama"), offload_checkpoints=True)


def test_qlora_config_after_prepare() -> None:
    """The QLoraConfig flow: prepare the dense model, then get_peft_model quantizes it and LoRA injects."""
    base = prepare_model_for_kbit_training(tiny_model("llama").to(torch.bfloat16))
    model = peftkit.get_peft_model(base, QLoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05))
    assert isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    losses = train(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    assert losses[-1] < losses[0] and base.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("optimizer_class", [bnb.optim.PagedAdamW, bnb.optim.PagedAdamW8bit])
def test_paged_optimizers(optimizer_class: type[torch.optim.Optimizer]) -> None:
    model = lora(prepare_model_for_kbit_training(bf16_quantized()))
    before = [p.detach().clone() for p in trainable(model)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = train(model, optimizer_class(trainable(model), lr=1e-2))
    on_cpu = next(model.parameters()).device.type == "cpu"
    assert not on_cpu or any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught), (
        "on the CPU bitsandbytes says it falls back to unpaged state"
    )
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, b) for p, b in zip(trainable(model), before))


class _Tokens(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in sample_inputs("llama", labels=True, seed=index).items()}


def _trainer(model: torch.nn.Module, folder: Path, optim: str) -> tf.Trainer:
    args = tf.TrainingArguments(
        output_dir=str(folder),
        max_steps=3,
        per_device_train_batch_size=2,
        optim=optim,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    return tf.Trainer(model=model, args=args, train_dataset=_Tokens())


@pytest.mark.parametrize("optim", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_trainer_with_paged_optimizer(optim: str, tmp_path: Path) -> None:
    model = lora(prepare_model_for_kbit_training(quantized("llama")))
    before = [p.detach().clone() for p in trainable(model)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        result = _trainer(model, tmp_path, optim).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(p, b) for p, b in zip(trainable(model), before))
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_trainer_with_a_transformers_4bit_base(tmp_path: Path) -> None:
    """transformers.Trainer trains a base loaded with BitsAndBytesConfig once it carries peftkit adapters."""
    model = lora(prepare_model_for_kbit_training(loaded_in_4bit("llama", tmp_path / "base")))
    before = [p.detach().clone() for p in trainable(model)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        _trainer(model, tmp_path, "paged_adamw_32bit").train()
    assert all(not torch.equal(p, b) for p, b in zip(trainable(model), before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_steps_train_a_4bit_model_as_eager_steps_do() -> None:
    """GraphedTrainingStep over the fused 4-bit layers (checkpointed, with a padding mask): eager steps' losses and weights."""
    from peftkit_lora import GraphedTrainingStep

    data = [{k: v.cuda() for k, v in sample_inputs("llama", labels=True, seed=seed).items()} for seed in range(5)]

    def trained(graphed: bool) -> tuple[list[float], list[torch.Tensor]]:
        base = quantize_model(tiny_model("llama"), device="cuda", bnb_4bit_compute_dtype=torch.float32)
        torch.manual_seed(1)
        model = peftkit.get_peft_model(prepare_model_for_kbit_training(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-2, capturable=True)
        if graphed:
            step = GraphedTrainingStep(model.train(), optimizer, warmup_steps=2)
            losses = [step(batch).item() for batch in data]
        else:
            losses = []
            for batch in data:
                optimizer.zero_grad(set_to_none=True)
                loss = model.train()(**batch).loss
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return losses, [p.detach() for p in trainable(model)]

    eager_losses, eager_weights = trained(graphed=False)
    graphed_losses, graphed_weights = trained(graphed=True)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-4)
    for eager, graphed in zip(eager_weights, graphed_weights, strict=True):
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
