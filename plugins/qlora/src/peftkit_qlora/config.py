"""QLoraConfig: a LoraConfig that also says how to quantize the base model's linear layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit import ConfigError
from peftkit_lora import LoraConfig

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA over a base whose linear layers are quantized with bitsandbytes when the adapter is added.

    With ``quantize=True`` (the default) every ``nn.Linear``/``Conv1D`` of the base
    model except the output head and ``modules_to_save`` becomes a 4-bit layer
    (``bnb_4bit_quant_type`` "nf4" or "fp4", optional double quantization of the
    scales) or, with ``load_in_8bit=True``, an LLM.int8 layer. The field names are
    those of transformers' ``BitsAndBytesConfig``. ``bnb_4bit_compute_dtype``
    (``None``: the dtype of the base weights) is the dtype the base matmul and the
    LoRA delta run in. ``quantize=False`` adapts a base that is already quantized
    (by ``from_pretrained(quantization_config=...)`` or :func:`quantize_model`).

    Saved adapters are plain PEFT LoRA: the quantization fields describe the
    base model, not the adapter, so they are not written to ``adapter_config.json``.
    """

    QUANTIZATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "quantize",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "llm_int8_threshold",
    )

    quantize: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str | None = None
    llm_int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ConfigError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {self.bnb_4bit_quant_type!r}")
        compute = self.bnb_4bit_compute_dtype
        if compute is not None and not isinstance(compute, str):  # a torch.dtype: keep the config JSON-friendly
            compute = str(compute).removeprefix("torch.")
        if compute is not None and compute not in COMPUTE_DTYPES:
            raise ConfigError(f"bnb_4bit_compute_dtype must be one of {COMPUTE_DTYPES} or None, got {compute!r}")
        self.bnb_4bit_compute_dtype = compute

    def quantization_options(self) -> dict[str, Any]:
        """The keyword arguments :func:`peftkit_qlora.quantize_model` takes, from this config."""
        return {
            "load_in_8bit": self.load_in_8bit,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
            "llm_int8_threshold": self.llm_int8_threshold,
        }

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face PEFT's LoRA fields only: the adapter file is plain LoRA."""
        data = super().to_dict()
        for key in self.QUANTIZATION_FIELDS:
            data.pop(key)
        return data
