"""RankAllocator checkpoints: ``state_dict`` / ``load_state_dict`` resume exactly, refuse
what does not fit, and load the files an older allocator wrote.

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

import copy
import io
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


# -- state_dict / load_state_dict on fresh runs -------------------------------------------------
KW = dict(target_r=2, tinit=2, tfinal=3, total_step=14, deltaT=2)


def _run(stop: int, model: nn.Module | None = None) -> tuple[nn.Module, RankAllocator]:
    """``golden_model`` stepped by an allocator with ``KW`` through step ``stop``."""
    model = golden_model() if model is None else model
    alloc = RankAllocator(model, **KW)
    for step in range(stop + 1):
        set_grads(model, step)
        alloc.update_and_allocate(step)
    return model, alloc


@pytest.mark.parametrize("stop", [1, 6, 12])  # warm-up, budgeting, final phase
def test_state_dict_resumes_exactly(stop: int) -> None:
    model, alloc = _run(stop)
    buffer = io.BytesIO()
    torch.save(alloc.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = golden_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = RankAllocator(resumed_model, **{**KW, "total_step": None})  # taken from the state
    resumed.load_state_dict(saved)
    assert (resumed.step, resumed.budget, resumed.total_step) == (alloc.step, alloc.budget, 14)
    assert resumed.rank_pattern == alloc.rank_pattern and resumed.finalized == alloc.finalized
    for m, a in ((model, alloc), (resumed_model, resumed)):
        for step in range(stop + 1, 17):
            set_grads(m, step)
            a.update_and_allocate(step)
    for (name, ta), tb in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(ta, tb), name
    sa, sb = alloc.state_dict(), resumed.state_dict()
    assert sa["rank_pattern"] == sb["rank_pattern"] and sa["keep"] == sb["keep"]


def test_state_dict_is_plain_and_safetensors_ready() -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = _run(4)[1].state_dict()
    for key in ("ema_sensitivity", "ema_uncertainty"):
        back = safetensors_torch.load(safetensors_torch.save(sd[key]))
        assert back.keys() == sd[key].keys()
        assert all(torch.equal(back[k], sd[key][k]) for k in back)
    assert sd["ema_sensitivity"]["2.lora_B"].shape == (3, 4)
    plain = {k: v for k, v in sd.items() if not k.startswith("ema_")}
    assert all(not isinstance(v, torch.Tensor) for v in plain.values())


def _edit(sd: dict[str, Any], change: str) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    if change == "format":
        sd["format"] = "something else"
    elif change == "adapter":
        sd["adapter_name"] = "other"
    elif change == "config":
        sd["config"]["tinit"] = 1
    elif change == "missing_key":
        del sd["keep"]
    elif change == "ema_shape":
        sd["ema_uncertainty"]["1.lora_A"] = torch.zeros(3, 5)
    elif change == "ema_missing":
        del sd["ema_sensitivity"]["0.lora_E"]
    elif change == "ema_nan":
        sd["ema_sensitivity"]["2.lora_B"][0, 0] = math.nan
    return sd


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("format", "Not a RankAllocator state"),
        ("adapter", "adapter 'other'"),
        ("config", "other allocator settings"),
        ("missing_key", "lacks"),
        ("ema_shape", r"1\.lora_A.*shape \(4, 6\)"),
        ("ema_missing", r"0\.lora_E"),
        ("ema_nan", r"2\.lora_B.*NaN"),
    ],
)
def test_load_state_dict_rejects_mismatches(change: str, match: str) -> None:
    sd = _run(0)[1].state_dict()
    fresh = RankAllocator(golden_model(), **KW)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(_edit(sd, change))
    after, untouched = fresh.state_dict(), RankAllocator(golden_model(), **KW).state_dict()
    for key in ("ema_sensitivity", "ema_uncertainty"):  # unchanged
        assert all(torch.equal(t, untouched[key][k]) for k, t in after.pop(key).items())
        del untouched[key]
    assert after == untouched


@pytest.mark.parametrize(
    ("targets", "ranks"),
    [(["0", "1"], {}), (["0", "1", "2"], {"1": 3})],
    ids=["fewer", "other_rank"],
)
def test_load_state_dict_rejects_other_models(targets: list[str], ranks: dict[str, int]) -> None:
    sd = RankAllocator(golden_model(), **KW).state_dict()
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3))
    inject_adapters(model, targets, rank=4, rank_pattern=ranks)
    other = RankAllocator(model, **{**KW, "target_r": 1})
    sd["config"]["target_r"] = 1
    with pytest.raises(ValueError, match="other adapted modules or ranks"):
        other.load_state_dict(sd)


if __name__ == "__main__":
    sys.exit(main())
