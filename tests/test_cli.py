"""The ``peftkit`` command line, run as the installed console script in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peftkit.cli import split_key

LORA_COUNT = 2 * ((4 * 16 + 16 * 4) + (4 * 16 + 8 * 4))  # 2 layers x (q_proj 16->16, v_proj 16->8) at r=4
BOX_CHARS = set("┃│┏━")
# Runs the CLI in-process and, at exit, lists every module that was imported (on stderr).
IMPORT_PROBE = """
import atexit, sys
atexit.register(lambda: print("MODULES", *sorted(sys.modules), file=sys.stderr))
from peftkit.cli import main
main(args=sys.argv[1:], prog_name="peftkit")
"""


def command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m peftkit.cli``."""
    script = shutil.which("peftkit", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "peftkit.cli"]


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``peftkit ARGS`` offline with no plugin settings inherited; ``pythonpath`` dirs are prepended.

    With ``probe=True`` the CLI runs under :data:`IMPORT_PROBE`, to see what it imported.
    """

    def run_cli(*args: str, pythonpath: Sequence[Path] = (), probe: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("PEFTKIT_", "FORCE_COLOR", "TTY_"))}
        environ["HF_HUB_OFFLINE"] = "1"
        environ["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [environ.get("PYTHONPATH")])])
        environ.update(env)
        argv = [sys.executable, "-c", IMPORT_PROBE] if probe else command()
        return subprocess.run([*argv, *args], check=False, capture_output=True, text=True, env=environ, timeout=120)

    return run_cli


def run_json(run: Callable[..., subprocess.CompletedProcess[str]], *args: str, **kwargs: Any) -> Any:
    result = run(*args, "--json", **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit status 1, a message on stderr naming every fragment, and no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def fake_dist(tmp_path: Path) -> Callable[[str, str, str], Path]:
    """Factory ``(dist, entry_point, module_source) -> folder``: a distribution to put on PYTHONPATH."""

    def make(dist: str, entry_point: str, source: str) -> Path:
        root = tmp_path / dist
        info = root / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[peftkit]\n{entry_point} = {dist}_mod\n")
        (root / f"{dist}_mod.py").write_text(source)
        return root

    return make


@pytest.fixture
def broken_dist(fake_dist: Callable[[str, str, str], Path]) -> Path:
    return fake_dist("brokenplug", "broken", 'raise ImportError("needs the frobnicator library")\n')


def assert_torch_free(stderr: str) -> list[str]:
    """The modules an :data:`IMPORT_PROBE` run imported, after checking torch is not one of them."""
    modules = next(line.split()[1:] for line in stderr.splitlines() if line.startswith("MODULES "))
    assert not [m for m in modules if m == "torch" or m.startswith("torch.")]
    return modules


# ------------------------------------------------------------------ methods
def test_methods_lists_lora_without_torch(run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = run("methods", "--json", probe=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    lora = next(m for m in data["methods"] if m["name"] == "lora")
    assert lora["distribution"] == "peftkit-lora"
    assert lora["peft_type"] == "LORA"
    assert {"merge", "mixed-batch"} <= set(lora["capabilities"])
    assert lora["version"]
    assert not [b for b in data["broken"] if b["distribution"] == "peftkit-lora"]
    assert "peftkit_lora.plugin" in assert_torch_free(result.stderr)


def test_methods_plain_when_piped_and_rich_on_a_terminal(run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    piped = run("methods")
    assert piped.returncode == 0, piped.stderr
    assert "peftkit-lora" in piped.stdout and not BOX_CHARS & set(piped.stdout)
    terminal = run("methods", TTY_COMPATIBLE="1", COLUMNS="200")
    assert "peftkit-lora" in terminal.stdout and BOX_CHARS & set(terminal.stdout)


def test_broken_plugin_is_listed_and_others_keep_working(run: Callable[..., subprocess.CompletedProcess[str]], broken_dist: Path) -> None:
    data = run_json(run, "methods", pythonpath=[broken_dist])
    assert "lora" in [m["name"] for m in data["methods"]]
    assert [b for b in data["broken"] if b["distribution"] == "brokenplug"] == [
        {"distribution": "brokenplug", "entry_point": "broken", "error": "ImportError: needs the frobnicator library"}
    ]
    plain = run("methods", pythonpath=[broken_dist])
    assert plain.returncode == 0 and "needs the frobnicator library" in plain.stdout


def test_strict_plugins_turns_a_broken_plugin_into_an_error(run: Callable[..., subprocess.CompletedProcess[str]], broken_dist: Path) -> None:
    result = run("methods", pythonpath=[broken_dist], PEFTKIT_STRICT_PLUGINS="1")
    assert_clean_error(result, "brokenplug", "needs the frobnicator library")


def test_duplicate_method_names_both_distributions(run: Callable[..., subprocess.CompletedProcess[str]], fake_dist: Callable[[str, str, str], Path]) -> None:
    source = (
        "import peftkit\n\n\n"
        "@peftkit.hookimpl\n"
        "def peftkit_register_methods(register):\n"
        '    register(peftkit.MethodSpec(name="lora", peft_type="LORA2", config_class=peftkit.PeftConfig))\n'
    )
    result = run("methods", pythonpath=[fake_dist("duplug", "lora2", source)])
    assert_clean_error(result, "'lora'", "peftkit-lora", "duplug")


def test_load_plugins_selects_distributions(run: Callable[..., subprocess.CompletedProcess[str]], broken_dist: Path) -> None:
    none = run_json(run, "methods", pythonpath=[broken_dist], PEFTKIT_LOAD_PLUGINS="")
    assert none == {"methods": [], "broken": []}
    only = run_json(run, "methods", pythonpath=[broken_dist], PEFTKIT_LOAD_PLUGINS="peftkit-lora")
    assert [m["name"] for m in only["methods"]] == ["lora"] and only["broken"] == []
    plain = run("methods", PEFTKIT_LOAD_PLUGINS="")
    assert plain.returncode == 0 and "No methods installed" in plain.stdout


# ------------------------------------------------------------------ inspect
@dataclass
class Tiny:
    base: Path  # a saved LlamaForCausalLM with a tokenizer
    adapter: Path  # a LoRA adapter for it (r=4 on q_proj and v_proj, random B)
    trainable: int  # the adapter's trainable parameters, as PeftModel counts them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    import peftkit
    from peftkit_lora import LoraConfig

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(root / "base")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), lora)
    model.save_pretrained(root / "adapter")
    return Tiny(root / "base", root / "adapter", model.get_nb_trainable_parameters()[0])


def test_inspect_json(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny) -> None:
    result = run("inspect", str(tiny.adapter), "--json", probe=True)
    assert result.returncode == 0, result.stderr
    assert "peftkit.io" in assert_torch_free(result.stderr)
    report = json.loads(result.stdout)
    assert report["method"] == "LORA"
    assert report["base_model"] == str(tiny.base)
    assert report["config"]["r"] == 4 and report["task_type"] == "CAUSAL_LM"
    modules = {row["module"]: row for row in report["modules"]}
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(row["rank"] == 4 for row in modules.values())
    assert modules["model.layers.0.self_attn.v_proj"]["tensors"] == {"lora_A.weight": [4, 16], "lora_B.weight": [8, 4]}
    assert report["totals"] == {"modules": 4, "tensors": 8, "parameters": LORA_COUNT}
    assert tiny.trainable == LORA_COUNT
    assert report["dtypes"] == {"F32": LORA_COUNT}
    assert report["size_bytes"] == sum(p.stat().st_size for p in tiny.adapter.iterdir())


def test_inspect_plain(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny) -> None:
    result = run("inspect", str(tiny.adapter))
    assert result.returncode == 0, result.stderr
    assert "method: LORA" in result.stdout
    assert "model.layers.1.self_attn.q_proj" in result.stdout
    assert f"{LORA_COUNT:,}" in result.stdout and not BOX_CHARS & set(result.stdout)


def test_inspect_truncated_weights(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny.adapter, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_clean_error(run("inspect", str(folder)), "truncated", str(weights))


def test_inspect_bad_config(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny.adapter, tmp_path / "adapter")
    (folder / "adapter_config.json").write_text("{not json")
    assert_clean_error(run("inspect", str(folder), "--json"), "adapter_config.json is not valid JSON")
    assert_clean_error(run("inspect", str(tmp_path / "missing")), "is not an adapter folder")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A.weight")),
        ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "lora_embedding_A")),
        ("base_model.model.model.layers.0.mlp.up_proj.base_layer.bias", ("model.layers.0.mlp.up_proj", "base_layer.bias")),
        ("base_model.model.score.weight", ("score", "weight")),
        ("base_model.model.model.layers.0.self_attn.k_proj.ia3_l", ("model.layers.0.self_attn.k_proj", "ia3_l")),
        ("base_model.classifier.weight", ("classifier", "weight")),
        ("prompt_embeddings", ("", "prompt_embeddings")),
    ],
)
def test_split_key(key: str, expected: tuple[str, str]) -> None:
    assert split_key(key) == expected


# -------------------------------------------------------------------- merge
def test_merge_matches_the_adapter(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert_clean_error(run("merge", str(tiny.base), str(tiny.adapter), str(out)), "not empty", "--force")
    result = run_json(run, "merge", str(tiny.base), str(tiny.adapter), str(out), "--force")
    assert result["auto_class"] == "AutoModelForCausalLM" and result["method"] == "LORA"
    assert result["tokenizer"] == "saved" and {"config.json", "model.safetensors"} <= set(result["files"])
    assert (out / "notes.txt").read_text() == "kept"

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny.base)
    base_logits = base(ids).logits
    with torch.no_grad():
        expected = peftkit.PeftModel.from_pretrained(base, tiny.adapter)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == [1, 2]


def test_merge_bad_base(run: Callable[..., subprocess.CompletedProcess[str]], tiny: Tiny, tmp_path: Path) -> None:
    assert_clean_error(run("merge", str(tmp_path / "nothing"), str(tiny.adapter), str(tmp_path / "out")), "cannot load base model")
    assert not (tmp_path / "out").exists()
