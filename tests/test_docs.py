"""The Python examples in the docs and the README run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
# documents whose every ```python block must run (blocks marked "# notest" are skipped),
# relative to the repository root
RUNNABLE = [
    "README.md",
    "docs/core.md",
    "docs/quickstart.md",
    "docs/phases.md",
    "docs/allocator.md",
]


def _blocks(name: str) -> list[str]:
    return [b for b in BLOCK.findall((ROOT / name).read_text()) if "# notest" not in b]


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(name)
    assert blocks, f"{name} has no runnable example"
    monkeypatch.chdir(tmp_path)  # examples that save an adapter write it here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, name, "exec"), namespace)


@pytest.mark.parametrize("package", ["adalora_core", "adalora_torch", "adalora_hf"])
def test_api_reference_names_every_public_name(package: str) -> None:
    module = pytest.importorskip(package)
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in module.__all__ if f"`{n}" not in text]
    assert not missing, f"docs/api.md does not document {package}.{missing}"
