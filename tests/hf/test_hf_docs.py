"""docs/hf.md runs as written (its ```python blocks in order, one namespace), and the
docstring examples of adalora_hf pass as doctests."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
# the modules whose docstrings show an example; each must have at least one
MODULES = ["adalora_hf._config", "adalora_hf._targets"]


def _blocks(name: str) -> list[str]:
    return [b for b in BLOCK.findall((DOCS / name).read_text()) if "# notest" not in b]


def test_hf_md_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("hf.md")
    text = (DOCS / "hf.md").read_text()
    # the documented example: the config, the wrapping and the loop calling update_and_allocate
    # after optimizer.step() and before zero_grad()
    assert 'model = AdaLoraModel(model, config, "default")' in text
    assert re.search(
        r"optimizer\.step\(\)\n\s+model\.base_model\.update_and_allocate\(i_step\)\n"
        r"\s+optimizer\.zero_grad\(\)",
        text,
    )
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/hf.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params:" in out
    assert "lower target_r or raise init_r" in out  # the validation example printed its errors
    assert namespace["model"].rankallocator.finalized


def test_migrating_doc_exists_and_names_the_import_change() -> None:
    text = (DOCS / "migrating-from-peft.md").read_text()
    assert "from adalora_hf import" in text


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no docstring example"
    assert result.failed == 0
