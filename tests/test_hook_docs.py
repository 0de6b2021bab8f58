"""Every hook in peftkit.hookspecs has a docstring and a section of docs/hooks.md showing its exact signature."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peftkit import hookspecs

HOOKS_MD = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HOOKS = {
    name: func
    for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(func, f"{hookspecs.PROJECT}_spec")
}


def normalise(code: str) -> str:
    """Drop whitespace, quotes (string annotations) and trailing commas, so layout does not matter."""
    code = re.sub(r"[\s'\"]", "", code)
    return re.sub(r",(?=[)\]])", "", code)


def signature_text(func: Callable[..., Any]) -> str:
    return normalise(f"def {func.__name__}{inspect.signature(func)}")


def sections() -> dict[str, str]:
    """``## heading`` -> the text up to the next such heading."""
    found: dict[str, str] = {}
    for part in re.split(r"^## ", HOOKS_MD.read_text(), flags=re.MULTILINE)[1:]:
        heading, _, body = part.partition("\n")
        found[heading.strip().strip("`")] = body
    return found


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_hookspecs_found() -> None:
    assert "peftkit_inject" in HOOKS, "the hookspec marker lookup found no hooks"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_docstring(name: str) -> None:
    assert inspect.getdoc(HOOKS[name]), f"hookspec {name} has no docstring"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_documented_with_exact_signature(name: str) -> None:
    section = sections().get(name)
    assert section is not None, f"docs/hooks.md has no section '## {name}'"
    wanted = signature_text(HOOKS[name])
    assert any(wanted + ":" in normalise(block) for block in code_blocks(section)), (
        f"no code block in '## {name}' of docs/hooks.md shows its signature: def {name}{inspect.signature(HOOKS[name])}"
    )


def test_no_section_for_a_missing_hook() -> None:
    stale = sorted(h for h in sections() if h.startswith("peftkit_") and h not in HOOKS)
    assert not stale, f"docs/hooks.md documents hooks that peftkit.hookspecs lacks: {stale}"
