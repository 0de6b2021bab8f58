"""P-tuning's own features: the prompt encoder (MLP and LSTM) against PEFT's, and what a saved adapter holds."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import peftkit
from peftkit_prompt.testing.models import KINDS, TASK_TYPES, inputs, logits_of, randomise_heads, tiny, user_positions
from peftkit_ptuning import PromptEncoderConfig

N = 3
ENCODERS = ["MLP", "LSTM"]


def fields(kind: str, encoder: str, **extra: object) -> dict:
    return {
        "num_virtual_tokens": N,
        "task_type": TASK_TYPES[kind],
        "encoder_reparameterization_type": encoder,
        "encoder_hidden_size": 8,
        **extra,
    }


def encoder_of(model: peftkit.PeftModel) -> torch.nn.Module:
    return model.base_model.peftkit_virtual_tokens["default"]


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("kind", KINDS)
def test_encoder_computes_what_peft_computes(kind: str, encoder: str) -> None:
    """PEFT's trained encoder weights give the same outputs here (T5: the LSTM runs over PEFT's 2n tokens)."""
    batch = inputs(kind)
    theirs = peft.get_peft_model(tiny(kind), peft.PromptEncoderConfig(**fields(kind, encoder)))
    randomise_heads(theirs)
    ours = peftkit.get_peft_model(tiny(kind), PromptEncoderConfig(**fields(kind, encoder)))
    randomise_heads(ours)
    encoder_of(ours).load_state_dict(theirs.prompt_encoder["default"].state_dict())
    torch.testing.assert_close(
        logits_of(ours, batch), user_positions(logits_of(theirs, batch), kind, N), rtol=0, atol=0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_lstm_adapters_move_both_ways(kind: str, tmp_path: Path) -> None:
    batch = inputs(kind)
    torch.manual_seed(1)
    ours = peftkit.get_peft_model(tiny(kind), PromptEncoderConfig(**fields(kind, "LSTM", encoder_num_layers=1)))
    randomise_heads(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "ours")
    torch.testing.assert_close(
        user_positions(logits_of(theirs, batch), kind, N), logits_of(ours, batch), rtol=0, atol=0
    )

    theirs = peft.get_peft_model(tiny(kind), peft.PromptEncoderConfig(**fields(kind, "LSTM", encoder_num_layers=1)))
    randomise_heads(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    reference = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "theirs")
    ours = peftkit.PeftModel.from_pretrained(tiny(kind), tmp_path / "theirs")
    torch.testing.assert_close(
        logits_of(ours, batch), user_positions(logits_of(reference, batch), kind, N), rtol=0, atol=0
    )


def test_saved_table_is_the_encoders_output_without_dropout() -> None:
    model = peftkit.get_peft_model(tiny("llama"), PromptEncoderConfig(**fields("llama", "LSTM", encoder_dropout=0.5)))
    model.train()
    first, second = (model.adapter_state_dict("default")["prompt_embeddings"] for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert encoder_of(model).training, "saving must leave the encoder in training mode"
    encoder_of(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(first, encoder_of(model).table()[0], rtol=0, atol=0)


def test_loaded_adapter_trains_its_table(tmp_path: Path) -> None:
    """The file holds the encoder's output, not the encoder: a trainable load trains that table directly."""
    batch = inputs("gpt2", labels=True)
    model = peftkit.get_peft_model(tiny("gpt2"), PromptEncoderConfig(**fields("gpt2", "MLP")))
    model.save_pretrained(tmp_path / "first")
    loaded = peftkit.PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "first", is_trainable=True)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), rtol=0, atol=0)
    assert encoder_of(loaded).mlp_head is None
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.peftkit_virtual_tokens.default.embedding.weight"]
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded.train()(**batch).loss.backward()
    optimizer.step()
    loaded.save_pretrained(tmp_path / "second")
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "second")
    torch.testing.assert_close(
        user_positions(logits_of(theirs, batch), "gpt2", N), logits_of(loaded, batch), rtol=0, atol=0
    )


def test_config_defaults_and_checks() -> None:
    model = peftkit.get_peft_model(tiny("llama"), PromptEncoderConfig(num_virtual_tokens=2))
    config = model.peft_config["default"]
    assert (config.encoder_hidden_size, config.token_dim, config.num_layers, config.num_transformer_submodules) == (
        16,
        16,
        2,
        1,
    )
    assert isinstance(peftkit.make_config("p_tuning", num_virtual_tokens=2), PromptEncoderConfig)
    with pytest.warns(UserWarning, match="encoder_num_layers is ignored"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=4)
    for bad, match in [
        ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"encoder_dropout": 1.5}, "encoder_dropout"),
        ({"num_virtual_tokens": None}, "num_virtual_tokens"),
    ]:
        with pytest.raises(peftkit.ConfigError, match=match):
            PromptEncoderConfig(**{"num_virtual_tokens": 2, **bad})
