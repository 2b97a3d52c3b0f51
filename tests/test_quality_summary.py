"""The table of ``benchmarks/quality.py``: paired differences and the share of the gap closed,
against LoRA at the task's learning rate and at the extra ``lr xk`` rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")
lm_grid = pytest.importorskip("lm_grid")


def _runs() -> list:
    # seed s adds s/100 to every metric: paired differences are exact
    table = {
        "LoRA r=4": 2.0,
        "LoRA r=12": 1.8,
        "AdaLoRA orth=0.0": 1.95,  # closes 0.25 of 0.2
        "AdaLoRA orth=0.0, lr x2": 1.85,  # closes 0.75 of 0.2
        "LoRA r=4, lr x2": 1.9,
        "LoRA r=12, lr x2": 1.7,  # against these: 0.25 and -0.25
    }
    return [
        quality.Run("lm", m, s, v + s / 100, float("nan"), 0)
        for s in (0, 1, 2)
        for m, v in table.items()
    ]


def test_gap_closed_against_both_learning_rates() -> None:
    lines = quality.summary(_runs())
    main = {line.split("  ")[0]: line for line in lines if line.startswith(("AdaLoRA", "LoRA"))}
    assert main["AdaLoRA orth=0.0"].split()[-4] == "0.25"
    assert main["AdaLoRA orth=0.0, lr x2"].split()[-4] == "0.75"
    assert main["LoRA r=12, lr x2"].split()[-4] == "1.50"
    against = [line for line in lines if "paired, gap closed" in line]
    assert [line.split()[-1] for line in against] == ["-0.25", "0.25"]
    assert "LoRA r=4, lr x2 -> LoRA r=12, lr x2" in "\n".join(lines)


def test_grid_spec_errors_say_what_to_write() -> None:
    assert lm_grid.parse("ada:lr=2e-2,tfinal=.4") == ("ada", {"lr": 0.02, "tfinal": 0.4})
    with pytest.raises(ValueError, match="lora, ada or pattern"):
        lm_grid.parse("adalora:lr=1")
    with pytest.raises(ValueError, match="key=value"):
        lm_grid.parse("ada:lr")
