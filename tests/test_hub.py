"""Adapters load by Hub repo id through huggingface_hub's cache, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay the folder out as huggingface_hub's cache does for a downloaded model repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_load_by_repo_id_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    put_in_hub_cache(tmp_path / "cache", "someone/tiny-lora", tmp_path / "adapter")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    loaded = peftkit.PeftModel.from_pretrained(tiny_model("llama"), "someone/tiny-lora").eval()

    inputs = sample_inputs("llama")
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_repo_not_in_offline_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(peftkit.AdapterLoadError, match="someone/absent"):
        peftkit.PeftModel.from_pretrained(tiny_model("llama"), "someone/absent")
