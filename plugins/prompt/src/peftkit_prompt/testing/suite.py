"""VirtualTokenSuite: the behaviour every virtual-token method shares, checked on tiny real models.

A plugin subclasses it in a test file and says how to build its config, and
the matching Hugging Face PEFT config (the oracle for the file format)::

    class TestPromptTuning(VirtualTokenSuite):
        def make_config(self, kind):
            return PromptTuningConfig(num_virtual_tokens=self.n, task_type=TASK_TYPES[kind])

        def make_peft_config(self, kind):
            return peft.PromptTuningConfig(num_virtual_tokens=self.n, task_type=TASK_TYPES[kind])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import peftkit
from peftkit_prompt.calls import VirtualTokenInputError
from peftkit_prompt.config import PromptLearningConfig
from peftkit_prompt.testing.models import (
    GENERATIVE_KINDS,
    KINDS,
    generate_by_forward,
    inputs,
    logits_of,
    padded,
    randomise_heads,
    tiny,
    user_positions,
)

STEPS = 4


class VirtualTokenSuite:
    """Base class of a virtual-token plugin's behaviour tests."""

    n = 3  # virtual tokens
    atol = 1e-5

    def make_config(self, kind: str) -> PromptLearningConfig:
        raise NotImplementedError

    def make_peft_config(self, kind: str) -> Any:
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "kind" in metafunc.fixturenames:
            metafunc.parametrize("kind", KINDS)
        if "generative_kind" in metafunc.fixturenames:
            metafunc.parametrize("generative_kind", GENERATIVE_KINDS)

    def ours(self, kind: str, seed: int = 1) -> peftkit.PeftModel:
        torch.manual_seed(seed)
        model = peftkit.get_peft_model(tiny(kind), self.make_config(kind))
        randomise_heads(model)
        return model.eval()

    def same(self, actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
        torch.testing.assert_close(actual, expected, atol=self.atol, rtol=self.atol, msg=lambda m: f"{message}: {m}")

    # ------------------------------------------------------- PEFT, both ways
    def test_peftkit_adapter_loads_in_peft(self, kind: str, tmp_path: Path) -> None:
        import peft

        batch = inputs(kind)
        ours = self.ours(kind)
        expected = logits_of(ours, batch)
        ours.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path)
        self.same(user_positions(logits_of(theirs, batch), kind, self.n), expected, "PEFT read our adapter differently")

    def test_peft_adapter_loads_in_peftkit(self, kind: str, tmp_path: Path) -> None:
        import peft

        batch = inputs(kind)
        torch.manual_seed(1)
        theirs = peft.get_peft_model(tiny(kind), self.make_peft_config(kind))
        randomise_heads(theirs)
        theirs.save_pretrained(tmp_path)
        reference = peft.PeftModel.from_pretrained(tiny(kind), tmp_path)  # PEFT's own reading of its file
        ours = peftkit.PeftModel.from_pretrained(tiny(kind), tmp_path)
        expected = user_positions(logits_of(reference, batch), kind, self.n)
        self.same(logits_of(ours, batch), expected, "we read PEFT's adapter differently")
        self.same(
            logits_of(ours, batch), user_positions(logits_of(theirs, batch), kind, self.n), "vs PEFT's live model"
        )
        assert not any(p.requires_grad for p in ours.parameters()), "a loaded adapter is frozen unless is_trainable"

    def test_same_files_as_peft(self, kind: str, tmp_path: Path) -> None:
        import peft

        self.ours(kind).save_pretrained(tmp_path / "ours")
        peft.get_peft_model(tiny(kind), self.make_peft_config(kind)).save_pretrained(tmp_path / "theirs")
        ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        our_config, their_config = (
            json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")
        )
        assert set(our_config) <= set(their_config), f"fields PEFT lacks: {set(our_config) - set(their_config)}"
        for key in set(our_config) - {"inference_mode", "modules_to_save", "peft_version"}:
            assert our_config[key] == their_config[key], key

    def test_generate_matches_peft(self, generative_kind: str, tmp_path: Path) -> None:
        import peft

        kind = generative_kind
        ours = self.ours(kind)
        ours.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
        prompt = {k: v for k, v in inputs(kind).items() if k in ("input_ids", "attention_mask")}
        options = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False}
        assert torch.equal(ours.generate(**prompt, **options), theirs.generate(**prompt, **options))

    # ------------------------------------------------------------ generation
    @pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
    @pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
    def test_generate_matches_forward_loop(self, generative_kind: str, use_cache: bool, sample: bool) -> None:
        kind = generative_kind
        model = self.ours(kind)
        prompt = {k: v for k, v in inputs(kind).items() if k in ("input_ids", "attention_mask")}
        torch.manual_seed(7)
        expected = generate_by_forward(model, kind, prompt, STEPS, sample)
        torch.manual_seed(7)
        tokens = model.generate(
            **prompt,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=sample,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            use_cache=use_cache,
        )
        assert torch.equal(tokens, expected), f"generate gave {tokens.tolist()}, forward loop {expected.tolist()}"

    @pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
    def test_left_padded_generate_matches_single_rows(self, generative_kind: str, use_cache: bool) -> None:
        kind = generative_kind
        model = self.ours(kind)
        rows = [torch.tensor([5, 9, 13, 17, 21, 25]), torch.tensor([7, 11, 3])]
        side = "right" if kind == "t5" else "left"  # an encoder takes padding on the right, decoders on the left
        options = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "use_cache": use_cache}
        batch = model.generate(**padded(rows, side), **options)[:, -STEPS:]
        for i, row in enumerate(rows):
            alone = model.generate(
                input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **options
            )
            assert torch.equal(batch[i], alone[0, -STEPS:]), f"row {i} of a padded batch generated differently"

    # --------------------------------------------------------------- padding
    @pytest.mark.parametrize("side", ["left", "right"])
    def test_padded_forward_matches_single_rows(self, kind: str, side: str) -> None:
        if kind in ("bert", "bert-token", "t5") and side == "left":
            pytest.skip("absolute or relative positions of encoders move with left padding, in the base model too")
        model = self.ours(kind)
        rows = [torch.tensor([5, 9, 13, 17, 21, 25]), torch.tensor([7, 11, 3])]
        batch = padded(rows, side)
        extra: dict[str, torch.Tensor] = {}
        if kind in ("llama", "gpt2"):  # decoders take positions from the mask, as generate() computes them
            extra["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if kind == "t5":
            extra["decoder_input_ids"] = torch.tensor([[0, 4, 8], [0, 4, 8]])
        together = logits_of(model, batch, **extra)
        for i, row in enumerate(rows):
            single = {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
            if kind == "t5":
                single["decoder_input_ids"] = extra["decoder_input_ids"][:1]
            alone = logits_of(model, single)[0]
            if kind in ("llama", "gpt2", "bert-token"):
                real = batch["attention_mask"][i].bool()
                self.same(together[i][real], alone, f"row {i}, {side}-padded")
            else:
                self.same(together[i], alone, f"row {i}, {side}-padded")

    # --------------------------------------------------------------- outputs
    def test_outputs_have_the_inputs_shape(self, kind: str) -> None:
        batch = inputs(kind)
        base = tiny(kind)
        with torch.no_grad():
            expected = base(**batch, output_hidden_states=True)
            model = self.ours(kind)
            output = model(**batch, output_hidden_states=True)
            as_tuple = model(**batch, return_dict=False)
        assert output.logits.shape == expected.logits.shape
        if kind != "t5":
            assert [h.shape for h in output.hidden_states] == [h.shape for h in expected.hidden_states]
        assert isinstance(as_tuple, tuple)
        self.same(as_tuple[0], output.logits, "return_dict=False gave other logits")

    def test_labels_ignore_virtual_positions(self, kind: str, tmp_path: Path) -> None:
        batch = inputs(kind, labels=True)
        model = self.ours(kind)
        with torch.no_grad():
            output = model(**batch)
        if kind in ("llama", "gpt2"):
            # Virtual positions are never targets, but the last one predicts the first user token: PEFT's loss.
            import peft

            model.save_pretrained(tmp_path)
            theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
            with torch.no_grad():
                expected = theirs(**batch).loss
        else:
            logits, labels = output.logits, batch["labels"]
            expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.same(output.loss, expected, "the loss is not the loss of the user's positions")

    def test_question_answering_spans_point_at_user_tokens(self) -> None:
        base = tf.BertForQuestionAnswering(tiny("bert").config).eval()
        batch = {**inputs("bert"), "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 5])}
        config = self.make_config("bert")
        config.task_type = "QUESTION_ANS"
        model = peftkit.get_peft_model(base, config)
        with torch.no_grad():
            output = model(**batch)
        assert output.start_logits.shape == output.end_logits.shape == batch["input_ids"].shape
        start = torch.nn.functional.cross_entropy(output.start_logits, batch["start_positions"])
        end = torch.nn.functional.cross_entropy(output.end_logits, batch["end_positions"])
        expected = (start + end) / 2
        self.same(output.loss, expected, "span positions do not point at the user's tokens")

    def test_bare_model_states_have_the_inputs_shape(self) -> None:
        batch = inputs("llama")
        model = peftkit.get_peft_model(tiny("llama").model, self.make_config("llama"))
        with torch.no_grad():
            output = model(**batch, output_hidden_states=True)
        assert output.last_hidden_state.shape == (*batch["input_ids"].shape, 16)
        assert {h.shape for h in output.hidden_states} == {output.last_hidden_state.shape}

    def test_token_type_ids_get_zeros_for_virtual_tokens(self) -> None:
        batch = inputs("bert-token")
        model = self.ours("bert-token")
        without = logits_of(model, batch)
        self.same(logits_of(model, batch, token_type_ids=torch.zeros_like(batch["input_ids"])), without)

    @pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
    def test_gradient_checkpointing(self, kind: str, reentrant: bool) -> None:
        grads = []
        for checkpointing in (False, True):
            model = self.ours(kind)
            if checkpointing:  # the prompts make the embeddings need grad: no enable_input_require_grads() needed
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()
            model(**inputs(kind, labels=True)).loss.backward()
            adapter = model._adapters["default"]
            grads.append([p.grad.clone() for p in adapter.parameters()])
        for plain, checkpointed in zip(*grads, strict=True):
            self.same(checkpointed, plain, "gradient checkpointing changed the adapter's gradients")

    # ---------------------------------------------------------------- errors
    def test_bad_inputs_raise_a_peftkit_error(self) -> None:
        model = self.ours("llama")
        batch = inputs("llama")
        with pytest.raises(VirtualTokenInputError, match="attention_mask"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, 1:])
        with pytest.raises(VirtualTokenInputError, match="input_ids"):
            model(input_ids=batch["input_ids"][None])
        with pytest.raises(VirtualTokenInputError, match="needs one of"):
            model(attention_mask=batch["attention_mask"])
        assert issubclass(VirtualTokenInputError, peftkit.PeftkitError)

    def test_mixed_with_lora(self, tmp_path: Path) -> None:
        lora = pytest.importorskip("peftkit_lora")
        batch = inputs("llama")
        model = self.ours("llama")  # the virtual-token adapter first, so all-linear must skip its modules
        model.add_adapter("lora", lora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        assert not any("peftkit_virtual_tokens" in name for name in model._adapters["lora"].targets)
        model.save_pretrained(tmp_path)
        ours_alone = logits_of(peftkit.PeftModel.from_pretrained(tiny("llama"), tmp_path), batch)
        lora_alone = logits_of(peftkit.PeftModel.from_pretrained(tiny("llama"), tmp_path / "lora"), batch)

        self.same(logits_of(model, batch), ours_alone, "virtual tokens beside LoRA")
        model.set_adapter("lora")
        self.same(logits_of(model, batch), lora_alone, "LoRA beside virtual tokens")
        with model.disable_adapter():
            self.same(logits_of(model, batch), logits_of(tiny("llama"), batch), "disable_adapter with two methods")
        model.set_adapter("default")
        with pytest.raises(ValueError, match="mixed batches"):
            model(**batch, adapter_names=["default", "lora"])
        mixed = logits_of(model, batch, adapter_names=["lora", "__base__"])  # LoRA's own mixed batches still work
        self.same(mixed[0], lora_alone[0], "LoRA row of a LoRA mixed batch")
        self.same(mixed[1], logits_of(tiny("llama"), batch)[1], "base row of a LoRA mixed batch")
        model.delete_adapter("default")
        self.same(logits_of(model, batch), lora_alone, "LoRA after deleting the virtual tokens")

    def test_merge_is_refused(self) -> None:
        model = self.ours("llama")
        with pytest.raises(peftkit.MergeError, match="virtual tokens|cannot merge"):
            model.merge_and_unload()
        unloaded = model.unload()
        assert not hasattr(unloaded, "peftkit_virtual_tokens")
        self.same(logits_of(unloaded, inputs("llama")), logits_of(tiny("llama"), inputs("llama")))
