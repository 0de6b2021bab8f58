"""P-tuning v2: every layer of every stack gets its own prompts; generation, padding, checkpointing, dropout."""

from __future__ import annotations

import pytest
import torch
from conftest import TASK_TYPES, VIRTUAL, fresh, inputs_for, logits, prompted

import peftkit
from peftkit import ConfigError
from peftkit_ptuning_v2 import PTuningV2Config

KINDS = ("llama", "gpt2", "bert", "t5", "bert-tokens")


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_of_every_stack_learns_its_own_prompts(kind: str) -> None:
    model = prompted(kind).train()
    config = model.peft_config["default"]
    stacks = 2 if kind == "t5" else 1
    assert config.num_transformer_submodules == stacks
    table = model.base_model.peftkit_prefixes["default"].embedding.weight
    assert table.shape == (VIRTUAL, stacks * config.num_layers * 2 * config.token_dim)
    model(**inputs_for(kind, labels=True)).loss.backward()
    per_slot = table.grad.view(VIRTUAL, stacks * config.num_layers, 2, -1).abs().sum(dim=(0, 3))
    assert (per_slot > 0).all(), f"keys or values of some layer got no gradient: {per_slot}"
    assert logits(model, inputs_for(kind)).shape == logits(fresh(kind), inputs_for(kind)).shape


def test_t5_encoder_prompts_change_the_encoding() -> None:
    model = prompted("t5")
    inputs = inputs_for("t5")
    with torch.no_grad():
        prompted_encoding = model(**inputs).encoder_last_hidden_state
        with model.disable_adapter():
            base_encoding = model(**inputs).encoder_last_hidden_state
    assert prompted_encoding.shape == base_encoding.shape
    assert not torch.allclose(prompted_encoding, base_encoding)


def _greedy_loop(model: peftkit.PeftModel, kind: str, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    decoded = torch.zeros((ids.shape[0], 1), dtype=torch.long) if kind == "t5" else ids
    for _ in range(steps):
        with torch.no_grad():
            if kind == "t5":
                out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded, use_cache=False)
            else:
                out = model(input_ids=decoded, attention_mask=torch.ones_like(decoded), use_cache=False)
        decoded = torch.cat([decoded, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_equals_a_forward_loop(kind: str, use_cache: bool) -> None:
    model = prompted(kind)
    inputs = {k: v for k, v in inputs_for(kind).items() if k in ("input_ids", "attention_mask")}
    tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=use_cache)
    assert torch.equal(tokens, _greedy_loop(model, kind, inputs, 4))


def test_padded_rows_equal_unpadded_rows() -> None:
    t5 = prompted("t5")
    inputs = inputs_for("t5")
    short = inputs["input_ids"][1, :4]
    padded = dict(
        inputs, input_ids=torch.stack([inputs["input_ids"][0], torch.cat([short, torch.zeros(2, dtype=torch.long)])])
    )
    padded["attention_mask"] = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    alone = {"input_ids": short[None], "decoder_input_ids": inputs["decoder_input_ids"][1:]}
    torch.testing.assert_close(logits(t5, padded)[1], logits(t5, alone)[0], rtol=1e-5, atol=1e-5)

    tagger = prompted("bert-tokens")
    ids = inputs_for("bert-tokens")["input_ids"]
    row = ids[1, 2:]
    alone = logits(tagger, {"input_ids": row[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)})[0]
    for mask in (torch.arange(6) >= 2, torch.arange(6) < 4):  # left, then right padding
        placed = torch.zeros(6, dtype=torch.long).masked_scatter(mask, row)
        batch = {
            "input_ids": torch.stack([ids[0], placed]),
            "attention_mask": torch.stack([torch.ones(6), mask]).long(),
        }
        torch.testing.assert_close(logits(tagger, batch)[1][mask], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["t5", "bert-tokens", "gpt2"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(kind: str, reentrant: bool) -> None:
    def grads(checkpointing: bool) -> tuple[float, torch.Tensor]:
        model = prompted(kind)
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.base_model.enable_input_require_grads()
        model.train()
        loss = model(**inputs_for(kind, labels=True)).loss
        loss.backward()
        return loss.item(), model.base_model.peftkit_prefixes["default"].embedding.weight.grad

    (loss, grad), (expected_loss, expected) = grads(True), grads(False)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_prefix_dropout_acts_in_training_only() -> None:
    inputs = inputs_for("bert")
    model = prompted("bert", prefix_dropout=0.5)
    torch.testing.assert_close(logits(model, inputs), logits(model, inputs))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, model(**inputs).logits)
    plain = prompted("bert").train()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, logits(plain, inputs))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="prefix_dropout"):
        PTuningV2Config(num_virtual_tokens=4, prefix_dropout=1.5)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PTuningV2Config()
    with pytest.raises(peftkit.InjectError, match="num_transformer_submodules=1"):
        peftkit.get_peft_model(fresh("t5"), PTuningV2Config(num_virtual_tokens=4, num_transformer_submodules=1))
    with pytest.raises(peftkit.InjectError, match="key/value heads"):
        peftkit.get_peft_model(
            fresh("llama"), PTuningV2Config(num_virtual_tokens=4, token_dim=16, num_attention_heads=2)
        )
    assert (
        peftkit.make_config("p_tuning_v2", num_virtual_tokens=4, task_type=TASK_TYPES["bert"]).peft_type
        == "P_TUNING_V2"
    )
