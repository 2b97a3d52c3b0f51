"""The Python examples in the docs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
# documents whose every ```python block must run (blocks marked "# notest" are skipped)
RUNNABLE = ["core.md"]


def _blocks(name: str) -> list[str]:
    return [b for b in BLOCK.findall((DOCS / name).read_text()) if "# notest" not in b]


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_examples_run(name: str) -> None:
    blocks = _blocks(name)
    assert blocks, f"{name} has no runnable example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), namespace)
