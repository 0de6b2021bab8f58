"""Prefixes in generate() (with and without a cache), padding on either side, caches, and bad inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import DECODERS, TASK_TYPES, fresh, inputs_for, logits

import peftkit
from peftkit_prefix import PrefixInputError, PrefixTuningConfig

GENERATIVE = (*DECODERS, "t5")
VIRTUAL = 3


def prefixed(kind: str, seed: int = 1, **options: Any) -> peftkit.PeftModel:
    torch.manual_seed(seed)
    config = PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type=TASK_TYPES[kind], **options)
    return peftkit.get_peft_model(fresh(kind), config).eval()


def prompt(kind: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs_for(kind).items() if k in ("input_ids", "attention_mask")}


def step_by_step(
    model: peftkit.PeftModel, kind: str, inputs: dict[str, torch.Tensor], steps: int, sample: bool
) -> torch.Tensor:
    """Greedy or seeded-sampled decoding by full forwards without a cache, as a reference for generate()."""
    if sample:
        torch.manual_seed(7)
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    decoded = torch.zeros((ids.shape[0], 1), dtype=torch.long) if kind == "t5" else ids
    for _ in range(steps):
        with torch.no_grad():
            if kind == "t5":
                out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded, use_cache=False)
            else:
                out = model(input_ids=decoded, attention_mask=mask, use_cache=False)
        scores = out.logits[:, -1].float()
        if sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = scores.argmax(-1, keepdim=True)
        decoded = torch.cat([decoded, token], dim=1)
        if kind != "t5":
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return decoded


@pytest.mark.parametrize("kind", GENERATIVE)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_generate_equals_a_forward_loop(kind: str, use_cache: bool, sample: bool) -> None:
    model = prefixed(kind)
    inputs = prompt(kind)
    steps = 4
    options = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": sample, "use_cache": use_cache}
    if sample:
        options.update(top_k=0, top_p=1.0, temperature=1.0)
        torch.manual_seed(7)
    tokens = model.generate(**inputs, **options)
    assert torch.equal(tokens, step_by_step(model, kind, inputs, steps, sample))
    with model.disable_adapter():
        assert not torch.equal(model.generate(**inputs, **{**options, "do_sample": False}), tokens) or sample


@pytest.mark.parametrize("kind", GENERATIVE)
def test_generate_with_and_without_cache_agree_and_beams_work(kind: str) -> None:
    model = prefixed(kind)
    inputs = prompt(kind)
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    assert torch.equal(
        model.generate(**inputs, **options, use_cache=True), model.generate(**inputs, **options, use_cache=False)
    )
    beams = model.generate(**inputs, **options, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 2 * inputs["input_ids"].shape[0]


def _left_pad(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows]
    )
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", DECODERS)
def test_left_padded_batch_equals_unpadded_rows(kind: str) -> None:
    model = prefixed(kind)
    ids = inputs_for(kind)["input_ids"]
    rows = [ids[0], ids[1, 2:]]
    batch = _left_pad(rows)
    batched = logits(model, batch)
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    generated = model.generate(**batch, **options)
    for i, row in enumerate(rows):
        alone = {"input_ids": row[None], "attention_mask": torch.ones_like(row[None])}
        torch.testing.assert_close(batched[i, -len(row) :], logits(model, alone)[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(generated[i, -4:], model.generate(**alone, **options)[0, -4:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_on_either_side_for_token_classification(side: str) -> None:
    model = prefixed("bert-tokens")
    ids = inputs_for("bert-tokens")["input_ids"]
    short = ids[1, 2:]
    pad = torch.zeros(2, dtype=torch.long)
    padded = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask = (torch.arange(6) >= 2) if side == "left" else (torch.arange(6) < 4)
    batch = {"input_ids": torch.stack([ids[0], padded]), "attention_mask": torch.stack([torch.ones(6), mask]).long()}
    out = logits(model, batch)
    alone = logits(model, {"input_ids": short[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)})[0]
    torch.testing.assert_close(out[1][mask], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out[0], logits(model, {"input_ids": ids[:1], "attention_mask": torch.ones(1, 6, dtype=torch.long)})[0]
    )


def test_right_padded_sequence_classification_and_left_padded_t5_encoder() -> None:
    model = prefixed("bert")
    ids = inputs_for("bert")["input_ids"]
    batch = {
        "input_ids": torch.stack([ids[0], torch.cat([ids[1, :4], torch.zeros(2, dtype=torch.long)])]),
        "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
    }
    alone = logits(model, {"input_ids": ids[1:, :4], "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    torch.testing.assert_close(logits(model, batch)[1], alone[0], rtol=1e-5, atol=1e-5)

    t5 = prefixed("t5")
    inputs = inputs_for("t5")
    padded = dict(inputs, **_left_pad([inputs["input_ids"][0], inputs["input_ids"][1, 2:]]))
    alone = {"input_ids": inputs["input_ids"][1:, 2:], "decoder_input_ids": inputs["decoder_input_ids"][1:]}
    torch.testing.assert_close(logits(t5, padded)[1], logits(t5, alone)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ALL := ("llama", "gpt2", "bert", "t5", "bert-tokens"))
def test_outputs_have_the_shape_of_the_input(kind: str) -> None:
    model = prefixed(kind)
    inputs = inputs_for(kind)
    expected = logits(fresh(kind), inputs).shape
    out = model(**inputs)
    assert out.logits.shape == expected
    if kind in GENERATIVE:
        assert (
            out.past_key_values.get_seq_length()
            == VIRTUAL + (inputs.get("decoder_input_ids", inputs["input_ids"])).shape[1]
        )
        assert model(**inputs, use_cache=False).get("past_key_values") is None


@pytest.mark.parametrize("kind", DECODERS)
def test_returned_cache_continues_like_a_full_forward(kind: str) -> None:
    model = prefixed(kind)
    ids = inputs_for(kind)["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long))
        second = model(
            input_ids=ids[:, 4:],
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            past_key_values=first.past_key_values,
        )
        no_mask = model(input_ids=ids[:, :4])
        no_mask = model(input_ids=ids[:, 4:], past_key_values=no_mask.past_key_values)
    full = logits(model, {"input_ids": ids})
    torch.testing.assert_close(second.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_mask.logits, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_explicit_position_ids_are_shifted_past_the_prefix() -> None:
    model = prefixed("gpt2")
    inputs = inputs_for("gpt2")
    positions = torch.arange(6).expand(2, -1)
    torch.testing.assert_close(logits(model, inputs, position_ids=positions), logits(model, inputs))


def test_bad_inputs_raise_clear_errors() -> None:
    from transformers import DynamicCache

    model = prefixed("llama")
    inputs = inputs_for("llama")
    with torch.no_grad():
        foreign = fresh("llama")(**inputs).past_key_values
    with pytest.raises(PrefixInputError, match="computed without adapter 'default'"):
        model(input_ids=inputs["input_ids"], past_key_values=foreign)
    with pytest.raises(PrefixInputError, match="2-D attention mask"):
        model(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(PrefixInputError, match="covers 5 positions"):
        model(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 5, dtype=torch.long))
    out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(PrefixInputError, match="cannot continue from a cache it returned"):
        model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2)
    with pytest.raises(PrefixInputError, match="fixed-size cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    empty = DynamicCache()
    model(**inputs, past_key_values=empty)
    assert empty.get_seq_length() == VIRTUAL + 6, "an empty cache passed in is filled in place"
