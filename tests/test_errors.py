"""Bad input gets a clear error and leaves the model as it was; saves are atomic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.testing.models import sample_inputs, tiny_model
from peftkit_lora import LoraConfig


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A good LoRA adapter folder for the tiny Llama."""
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m).__name__) for n, m in model.named_modules()]


def assert_unchanged(model: torch.nn.Module, before: tuple[dict[str, torch.Tensor], list[tuple[str, str]]]) -> None:
    state, modules = snapshot(model)
    assert modules == before[1]
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def load_fails(model: peftkit.PeftModel, folder: Path, match: str, error: type[Exception] = peftkit.PeftkitError) -> None:
    before = snapshot(model)
    adapters = list(model.peft_config)
    with pytest.raises(error, match=match):
        model.load_adapter(folder, adapter_name="second")
    assert_unchanged(model, before)
    assert list(model.peft_config) == adapters


def test_method_not_installed_names_the_package(saved: Path) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(peftkit.MethodNotInstalledError, match="pip install peftkit-loha"):
        peftkit.PeftModel.from_pretrained(tiny_model("llama"), saved)


def test_lora_missing_from_environment_is_named(saved: Path) -> None:
    code = f"import peftkit; from peftkit.testing.models import tiny_model; peftkit.PeftModel.from_pretrained(tiny_model('llama'), {str(saved)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env={**_env(), "PEFTKIT_LOAD_PLUGINS": ""})
    assert result.returncode != 0
    assert "method 'LORA' is not installed: pip install peftkit-lora" in result.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"r": 4}', "lacks the field 'peft_type'")],
)
def test_bad_config_file(saved: Path, tmp_path: Path, content: str, match: str) -> None:
    folder = copy_adapter(saved, tmp_path / "bad")
    (folder / "adapter_config.json").write_text(content)
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["k_proj"]))
    load_fails(model, folder, match, peftkit.ConfigError)


def test_unsupported_feature_in_config_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = copy_adapter(saved, tmp_path / "dora")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["k_proj"]))
    load_fails(model, folder, "DoRA", peftkit.ConfigError)


def test_truncated_and_corrupt_weights(saved: Path, tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["k_proj"]))
    truncated = copy_adapter(saved, tmp_path / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 10])
    load_fails(model, truncated, "truncated")
    corrupt = copy_adapter(saved, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{garbage}}}}}")
    load_fails(model, corrupt, "corrupt")
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"not loaded")
    load_fails(model, pickle_only, "never loads")


def test_missing_unexpected_and_misshapen_tensors(saved: Path, tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["k_proj"]))
    tensors = load_file(saved / "adapter_model.safetensors")
    first = min(tensors)

    missing = copy_adapter(saved, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != first}, missing / "adapter_model.safetensors")
    load_fails(model, missing, "missing keys")

    extra = copy_adapter(saved, tmp_path / "extra")
    save_file({**tensors, "base_model.model.nowhere.lora_A.weight": torch.zeros(1)}, extra / "adapter_model.safetensors")
    load_fails(model, extra, "unexpected keys")

    misshapen = copy_adapter(saved, tmp_path / "misshapen")
    config = json.loads((misshapen / "adapter_config.json").read_text())
    (misshapen / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    load_fails(model, misshapen, "shape mismatches")


def test_failed_from_pretrained_returns_base_untouched(saved: Path, tmp_path: Path) -> None:
    base = tiny_model("llama")
    before = snapshot(base)
    misshapen = copy_adapter(saved, tmp_path / "misshapen")
    config = json.loads((misshapen / "adapter_config.json").read_text())
    (misshapen / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(peftkit.AdapterLoadError, match="shape mismatches"):
        peftkit.PeftModel.from_pretrained(base, misshapen)
    assert_unchanged(base, before)


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", "__base__", ""])
def test_adapter_names_that_would_escape_the_folder(name: str, tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="adapter name|reserved"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["v_proj"]))
    assert list(model.peft_config) == ["default"]


def test_interrupted_save_keeps_the_previous_adapter(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    old = {f.name: f.read_bytes() for f in saved.iterdir()}
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"]))

    def crash(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(saved)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == old, "old files intact, no temp files left"


def test_duplicate_adapter_name_and_unknown_adapter() -> None:
    model = peftkit.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    assert sample_inputs("llama")["input_ids"].shape[0] >= 2


@pytest.mark.parametrize(("field", "value", "match"), [("r", 0, "positive"), ("bias", "some", "bias"), ("lora_dropout", 1.5, "dropout"), ("task_type", "CLS", "task_type")])
def test_bad_config_values(field: str, value: object, match: str) -> None:
    with pytest.raises(peftkit.ConfigError, match=match):
        LoraConfig(target_modules=["q_proj"], **{field: value})
