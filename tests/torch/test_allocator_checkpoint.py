"""Checkpoints written by an older allocator load and resume exactly.

``tests/torch/data/allocator_v1.pt`` (``torch.save(state_dict())``) and
``tests/torch/data/allocator_v1/`` (``adalora_hf._checkpoint.save_allocator_state``) were
written by the allocator before its rewrite (caching machinery, ``_ema.py``), from the run
below: a tiny model of three SVDLinear layers with deterministic weights and gradients (no
random generator), saved after step ``SAVE_AT``. ``allocator_v1_expected.json`` holds what the
old code did next: the budget and pattern of every later step, and the sum of every EMA tensor
after the last budgeting step. ``python tests/torch/test_allocator_checkpoint.py`` rewrites the
files (only ever with a deliberately changed format).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adalora_torch import RankAllocator, inject_adapters

DATA = Path(__file__).resolve().parent / "data"
SETTINGS = {"target_r": 2, "tinit": 3, "tfinal": 5, "total_step": 40, "deltaT": 2}
SAVE_AT = 14  # the state is saved after this step (budgeting phase)
BAD_STEP = 5  # a step whose gradients hold an inf (skipped by the allocator)


def golden_model() -> nn.Module:
    """Layers 0 and 1 of equal shape (one group), layer 2 another; rank 4 each, float32."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3))
    inject_adapters(model, ["0", "1", "2"], rank=4, init_weights=False)
    with torch.no_grad():
        for k, (_, p) in enumerate(sorted(model.named_parameters())):
            x = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_(torch.sin(0.37 * x + k).reshape(p.shape).to(p.dtype))
    return model


def set_grads(model: nn.Module, step: int) -> None:
    """Gradients of every adapter A, E, B at ``step`` (an inf at ``BAD_STEP``)."""
    for k, (name, p) in enumerate(sorted(model.named_parameters())):
        if ".lora_" not in name or "ranknum" in name:
            continue
        x = torch.arange(p.numel(), dtype=torch.float64)
        g = torch.cos(0.91 * x + 1.3 * step + k) * (1.0 + 0.1 * k)
        if step == BAD_STEP and k == 3:
            g[0] = math.inf
        p.grad = g.reshape(p.shape).to(p.dtype)


def continue_run(model: nn.Module, alloc: RankAllocator, first: int) -> tuple[list[object], object]:
    """Steps ``first..total_step-1``: ``[step, budget, rank_pattern or None]`` per step, and
    the sum of each EMA tensor (``{key: {name: float}}``) after the last budgeting step."""
    out: list[object] = []
    sums = None
    last = SETTINGS["total_step"] - SETTINGS["tfinal"] - 1
    for step in range(first, SETTINGS["total_step"]):
        set_grads(model, step)
        budget, pattern = alloc.update_and_allocate(step)
        out.append([step, budget, pattern])
        if step == last:
            sd = alloc.state_dict()
            sums = {
                key: {n: float(t.double().sum()) for n, t in sd[key].items()}
                for key in ("ema_sensitivity", "ema_uncertainty")
            }
    return out, sums


def main() -> None:
    from adalora_hf._checkpoint import save_allocator_state

    model = golden_model()
    alloc = RankAllocator(model, **SETTINGS)
    for step in range(SAVE_AT + 1):
        set_grads(model, step)
        alloc.update_and_allocate(step)
    DATA.mkdir(exist_ok=True)
    torch.save(alloc.state_dict(), DATA / "allocator_v1.pt")
    save_allocator_state(alloc, str(DATA / "allocator_v1"))
    e_at_save = {n: p.tolist() for n, p in model.named_parameters() if ".lora_E." in n}
    rest, sums = continue_run(model, alloc, SAVE_AT + 1)
    expected = {
        "settings": SETTINGS,
        "save_at": SAVE_AT,
        "skipped_steps": alloc.skipped_steps,
        "lora_E_at_save": e_at_save,
        "steps_after_save": rest,
        "ema_sums_before_final": sums,
    }
    (DATA / "allocator_v1_expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def _resumed(form: str) -> tuple[nn.Module, RankAllocator]:
    """A fresh model in the state of the saved run (E as masked then) and a fresh allocator
    that loaded the old state in ``form``."""
    expected = json.loads((DATA / "allocator_v1_expected.json").read_text())
    model = golden_model()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in expected["lora_E_at_save"].items():
            params[name].copy_(torch.tensor(value))
    alloc = RankAllocator(model, **SETTINGS)
    if form == "torch":
        alloc.load_state_dict(torch.load(DATA / "allocator_v1.pt", weights_only=True))
    else:
        from adalora_hf._checkpoint import load_allocator_state

        assert load_allocator_state(alloc, str(DATA / "allocator_v1"))
    return model, alloc


@pytest.mark.parametrize("form", ["torch", "safetensors"])
def test_old_state_resumes_as_the_old_code_did(form: str) -> None:
    expected = json.loads((DATA / "allocator_v1_expected.json").read_text())
    assert expected["settings"] == SETTINGS and expected["save_at"] == SAVE_AT
    model, alloc = _resumed(form)
    assert alloc.step == SAVE_AT and alloc.skipped_steps == 1
    steps, sums = continue_run(model, alloc, SAVE_AT + 1)
    assert json.loads(json.dumps(steps)) == expected["steps_after_save"]
    # the EMAs themselves (sums of float32 tensors, in float64): equal to the last bit
    assert sums == expected["ema_sums_before_final"]
    assert alloc.finalized and alloc.skipped_steps == expected["skipped_steps"]


def test_old_state_round_trips_unchanged() -> None:
    """Loading the old file and saving again gives the same keys and values."""
    old: dict[str, Any] = torch.load(DATA / "allocator_v1.pt", weights_only=True)
    _, alloc = _resumed("torch")
    new = alloc.state_dict()
    assert sorted(new) == sorted(old)
    for key in old:
        if key.startswith("ema_"):
            assert sorted(new[key]) == sorted(old[key])
            for name, t in old[key].items():
                assert torch.equal(new[key][name], t), (key, name)
        else:
            assert new[key] == old[key], key


if __name__ == "__main__":
    sys.exit(main())
