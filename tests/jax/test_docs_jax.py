"""docs/jax.md runs as written: pretraining and AdaLoRA in JAX, served in torch (its asserts
check the final budget, the gain over the head alone and the torch outputs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

for _module in ("jax", "optax", "torch", "peft", "sklearn"):
    pytest.importorskip(_module, reason="docs/jax.md needs jax, optax, torch, peft, scikit-learn")

DOC = Path(__file__).resolve().parents[2] / "docs" / "jax.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.slow  # about 25 s of CPU; the jax nox session runs it
def test_jax_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 4, "docs/jax.md lost its example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["state"].budget == namespace["TARGET_R"] * len(namespace["LAYERS"])
