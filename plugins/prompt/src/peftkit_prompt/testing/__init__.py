"""Test helpers shared by the virtual-token plugins (peftkit-prompt, peftkit-ptuning); needs pytest and peft."""
