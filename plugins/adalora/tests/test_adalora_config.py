"""AdaLoraConfig: PEFT's fields and checks, clear errors for bad values, and layers LoRA cannot share."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from adalora_helpers import (
    config_fields,
    fresh,
    logits,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread)
    peftkit_model,
)

import peftkit
from peftkit import ConfigError, InjectError
from peftkit.testing.models import sample_inputs
from peftkit_adalora import AdaLoraConfig
from peftkit_lora import LoraConfig

BAD = [
    ({"total_step": None}, "needs total_step"),
    ({"total_step": 10, "tinit": 6, "tfinal": 4}, "no budgeting phase"),
    ({"total_step": 10, "beta1": 1.0}, "beta1 must be in"),
    ({"total_step": 10, "orth_reg_weight": -1}, "orth_reg_weight"),
    ({"total_step": 10, "deltaT": 0}, "deltaT"),
    ({"total_step": 10, "init_r": 0}, "init_r"),
    ({"total_step": 10, "rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"total_step": 10, "init_r": 2, "rank_pattern": {"q_proj.lora_E": [True, False, True]}}, "init_r=2 booleans"),
    (
        {"total_step": 10, "init_r": 2, "rank_pattern": {"q_proj.weight": [True, False]}},
        "is not '<module name>.lora_E'",
    ),
    ({"total_step": 10, "layers_pattern": "layers"}, "needs layers_to_transform"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_config_is_a_clear_error(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**fields)


def test_reads_peft_config_json_and_by_method_name(tmp_path: Path) -> None:
    peft.get_peft_model(fresh("llama"), peft.AdaLoraConfig(**config_fields("llama"))).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config = AdaLoraConfig.from_dict(data)
    assert (config.init_r, config.target_r, config.total_step, config.rank_pattern) == (3, 1, 5, None)
    assert peftkit.make_config("adalora", total_step=3) == AdaLoraConfig(total_step=3)
    with pytest.raises(ConfigError, match="use_dora"):
        AdaLoraConfig.from_dict({**data, "use_dora": True})


def test_unused_r_warns() -> None:
    with pytest.warns(UserWarning, match="ignores r"):
        AdaLoraConfig(r=16, total_step=5)


def test_rank_pattern_naming_an_untargeted_module_is_an_error() -> None:
    pattern = {"model.layers.0.mlp.up_proj.lora_E": [True, False, True]}
    with pytest.raises(InjectError, match="rank_pattern names modules"):
        peftkit_model("llama", target_modules=["q_proj"], rank_pattern=pattern)


def test_lora_and_adalora_cannot_share_a_layer() -> None:
    model = peftkit_model("llama", target_modules=["q_proj"])
    before = logits(model, sample_inputs("llama"))
    with pytest.raises(InjectError, match="cannot share a layer"):
        model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    assert "lora" not in model.peft_config
    lora = peftkit.get_peft_model(fresh("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(InjectError, match="LoraLinear, which this method cannot adapt"):
        lora.add_adapter("ada", AdaLoraConfig(**config_fields("llama", target_modules=["q_proj"])))
    model.add_adapter("lora", LoraConfig(target_modules=["k_proj"]))  # other layers are fine
    torch.testing.assert_close(logits(model, sample_inputs("llama")), before, rtol=0, atol=0)
