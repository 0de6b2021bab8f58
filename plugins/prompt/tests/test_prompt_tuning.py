"""Prompt tuning's own features: its three initialisations and its config checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import peftkit
from peftkit_prompt import PromptTuningConfig
from peftkit_prompt.testing.models import inputs, logits_of, tiny, word_level_tokenizer


def table(model: peftkit.PeftModel, name: str = "default") -> torch.Tensor:
    return model.base_model.peftkit_virtual_tokens[name].embedding.weight.detach()


def peft_table(model: peft.PeftModel) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight.detach()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return word_level_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize(("count", "expected"), [(8, [1, 5, 6, 7, 8, 9, 1, 5]), (3, [1, 5, 6])], ids=["repeat", "cut"])
def test_text_init_uses_the_texts_token_embeddings(tokenizer_dir: Path, count: int, expected: list[int]) -> None:
    config = {
        "num_virtual_tokens": count,
        "task_type": "CAUSAL_LM",
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "w5 w6 w7 w8 w9",
        "tokenizer_name_or_path": str(tokenizer_dir),
    }
    ours = peftkit.get_peft_model(tiny("llama"), PromptTuningConfig(**config))
    words = tiny("llama").get_input_embeddings().weight.detach()
    torch.testing.assert_close(table(ours), words[expected], rtol=0, atol=0)
    theirs = peft.get_peft_model(tiny("llama"), peft.PromptTuningConfig(**config))
    torch.testing.assert_close(table(ours), peft_table(theirs), rtol=0, atol=0)


def test_text_adapter_loads_without_its_tokenizer(tokenizer_dir: Path, tmp_path: Path) -> None:
    config = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w5 w6",
        tokenizer_name_or_path=str(tmp_path / "gone"),
        tokenizer_kwargs={"use_fast": True},
    )
    with pytest.raises(peftkit.InjectError, match="cannot load tokenizer"):
        peftkit.get_peft_model(tiny("llama"), config)
    config.tokenizer_name_or_path = str(tokenizer_dir)
    model = peftkit.get_peft_model(tiny("llama"), config)
    model.save_pretrained(tmp_path / "adapter")
    saved_config = tmp_path / "adapter" / "adapter_config.json"
    saved_config.write_text(saved_config.read_text().replace(str(tokenizer_dir), str(tmp_path / "gone")))
    loaded = peftkit.PeftModel.from_pretrained(
        tiny("llama"), tmp_path / "adapter"
    )  # inference mode: no tokenizer needed
    torch.testing.assert_close(logits_of(loaded, inputs("llama")), logits_of(model, inputs("llama")))


def test_sample_vocab_init_takes_vocabulary_rows_like_peft() -> None:
    config = {"num_virtual_tokens": 6, "task_type": "CAUSAL_LM", "prompt_tuning_init": "SAMPLE_VOCAB"}
    base, other_base = tiny("gpt2"), tiny("gpt2")
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(base, PromptTuningConfig(**config))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(other_base, peft.PromptTuningConfig(**config))
    words = tiny("gpt2").get_input_embeddings().weight.detach()
    for row in table(ours):
        assert (words == row).all(-1).any(), "a SAMPLE_VOCAB prompt row is not a vocabulary embedding"
    torch.testing.assert_close(table(ours), peft_table(theirs), rtol=0, atol=0)


def test_random_init_like_peft() -> None:
    base, other_base = tiny("t5"), tiny("t5")  # building a tiny model seeds torch itself
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(other_base, peft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"))
    assert table(ours).shape == (8, 16), "PEFT's seq2seq table has num_transformer_submodules=2 blocks"
    torch.testing.assert_close(table(ours), peft_table(theirs), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 2, "prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
        (
            {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"},
            "tokenizer_name_or_path",
        ),
        (
            {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"},
            "prompt_tuning_init_text",
        ),
        ({"num_virtual_tokens": 2, "tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
        ({"num_virtual_tokens": 2, "num_prompts": 0}, "num_prompts"),
        ({"num_virtual_tokens": 2, "token_dim": -1}, "token_dim"),
        (
            {
                "num_virtual_tokens": 2,
                "num_prompts": 2,
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "a",
                "tokenizer_name_or_path": "t",
            },
            "train identically",
        ),
    ],
)
def test_bad_config_is_a_config_error(fields: dict, match: str) -> None:
    with pytest.raises(peftkit.ConfigError, match=match):
        PromptTuningConfig(**fields)


def test_config_by_name_and_fields_on_disk() -> None:
    config = peftkit.make_config("prompt_tuning", num_virtual_tokens=5)
    assert isinstance(config, PromptTuningConfig)
    assert "num_prompts" not in config.to_dict(), "a plain adapter writes only PEFT's fields"
    assert PromptTuningConfig(num_virtual_tokens=5, num_prompts=2).to_dict()["num_prompts"] == 2
    assert PromptTuningConfig.from_dict(config.to_dict()) == config


def test_token_dim_must_match_the_model() -> None:
    with pytest.raises(peftkit.InjectError, match="token_dim"):
        peftkit.get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=2, token_dim=8))
