"""Tiny quantized models for the QLoRA tests: quantized by peftkit-qlora, or loaded 4-bit by transformers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from peftkit.testing.models import MODEL_KINDS, sample_inputs, tiny_model
from peftkit_qlora import quantize_model
from peftkit_qlora.quantize import disable_cpu_repacking

TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
FP32 = {"bnb_4bit_compute_dtype": torch.float32}

# bitsandbytes warns that its optional CPU kernels package is missing; the CPU path works without it.
warnings.filterwarnings("ignore", message=".*kernels-community.*")


@pytest.fixture(params=MODEL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def quantized(kind: str, seed: int = 0, **options: Any) -> torch.nn.Module:
    """``tiny_model(kind, seed)``, its linear layers quantized by peftkit-qlora (NF4, double quant, fp32 compute)."""
    return quantize_model(tiny_model(kind, seed), **{**FP32, **options})


def loaded_in_4bit(kind: str, folder: Path, **options: Any) -> torch.nn.Module:
    """The same tiny model saved to ``folder`` and loaded back 4-bit by transformers' ``BitsAndBytesConfig``."""
    model = tiny_model(kind)
    model.save_pretrained(folder)
    settings = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        **FP32,
        **options,
    }
    if kind == "bert":  # a classifier's head is trained in full (modules_to_save), so keep it dense, as peftkit does
        settings["llm_int8_skip_modules"] = ["classifier"]
    config = tf.BitsAndBytesConfig(**settings)
    loaded = type(model).from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=torch.float32)
    return without_cpu_repacking(loaded.eval())


def without_cpu_repacking(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every 4-bit layer off bitsandbytes' AVX512-BF16 eval path, which fails on layers this small."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            disable_cpu_repacking(module)
    return model


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def layer_types(model: torch.nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules()}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: torch.nn.Module, optimizer: Any, steps: int = 6) -> list[float]:
    """``steps`` training steps on the tiny Llama's sample batch (train mode); the losses."""
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**sample_inputs("llama", labels=True)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
