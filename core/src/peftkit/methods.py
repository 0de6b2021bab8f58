"""What a plugin declares about each method it provides."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.config import PeftConfig


@dataclass(frozen=True)
class MethodSpec:
    """One PEFT method, as a plugin registers it.

    ``name`` is the short name (``"lora"``) used by :func:`peftkit.make_config`
    and the CLI; ``peft_type`` is the ``adapter_config.json`` value. The flags
    tell the core (and ``peftkit methods``) what the method supports.
    ``modules_to_save_prefix`` starts the disk keys of the adapter's
    ``modules_to_save`` copies: PEFT writes ``base_model.model.classifier.weight``
    for layer methods but ``base_model.classifier.weight`` for prompt-learning ones.
    """

    name: str
    peft_type: str
    config_class: type[PeftConfig]
    description: str = ""
    mergeable: bool = False
    mixed_batches: bool = False
    rewrites_inputs: bool = False
    noop_at_init: bool = True
    model_kinds: tuple[str, ...] = ("causal-lm", "seq2seq-lm", "seq-cls", "torch-module")
    modules_to_save_prefix: str = "base_model.model."
    distribution: str = field(default="", compare=False)
    version: str = field(default="", compare=False)

    def capabilities(self) -> list[str]:
        """Names of the optional features this method supports."""
        flags = {
            "merge": self.mergeable,
            "mixed-batch": self.mixed_batches,
            "input-rewrite": self.rewrites_inputs,
            "noop-init": self.noop_at_init,
        }
        return [name for name, on in flags.items() if on]
