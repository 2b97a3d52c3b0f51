"""The functional allocator: phases, exact budgets, non-finite gradients, no mutation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_core import AllocatorState, Triplet, budget_schedule, rank_allocator


def make_params(rng: np.random.Generator, shapes: list[tuple[int, int]], r: int) -> list[Triplet]:
    return [
        Triplet(rng.normal(size=(r, i)), rng.normal(size=(r, 1)), rng.normal(size=(o, r)))
        for o, i in shapes
    ]


@st.composite
def runs(draw: st.DrawFn) -> dict:
    total_step = draw(st.integers(4, 30))
    tfinal = draw(st.integers(0, total_step - 2))
    tinit = draw(st.integers(0, total_step - tfinal - 1))
    r = draw(st.integers(1, 5))
    return dict(
        kw=dict(
            target_r=draw(st.integers(0, r)),
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_step,
            deltaT=draw(st.integers(1, 4)),
        ),
        r=r,
        shapes=draw(
            st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4)
        ),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None)
@given(runs())
def test_phases_budgets_and_no_mutation(run: dict) -> None:
    kw, r, shapes = run["kw"], run["r"], run["shapes"]
    rng = np.random.default_rng(run["seed"])
    alloc = rank_allocator(**kw)
    params = make_params(rng, shapes, r)
    state = alloc.init(params)
    init_budget, target_budget = r * len(shapes), kw["target_r"] * len(shapes)
    assert state.budget == init_budget and state.step == -1
    final = kw["total_step"] - kw["tfinal"]
    for step in range(kw["total_step"] + 2):
        grads = make_params(rng, shapes, r)
        before = state
        state = alloc.update(state, step, params, grads)
        assert before.step == step - 1  # the old state is untouched
        assert state.step == step
        kept = sum(int(m.sum()) for m in state.masks)
        if step >= final:
            assert state.finalized and state.apply and kept == target_budget
            assert state.ema_sensitivity == () and state.ema_uncertainty == ()
        else:
            budget, mask_now = budget_schedule(
                step,
                init_budget=init_budget,
                target_budget=target_budget,
                tinit=kw["tinit"],
                tfinal=kw["tfinal"],
                total_step=kw["total_step"],
                deltaT=kw["deltaT"],
            )
            assert (state.budget, state.apply) == (budget, mask_now)
            if mask_now:
                assert kept == budget
            for ts, tu in zip(state.ema_sensitivity, state.ema_uncertainty):
                assert all(np.isfinite(x).all() and (x >= 0).all() for x in (*ts, *tu))


def test_importance_stops_at_final_phase_and_final_uses_last_emas() -> None:
    rng = np.random.default_rng(0)
    alloc = rank_allocator(target_r=1, tinit=0, tfinal=2, total_step=6, deltaT=100)
    params = make_params(rng, [(3, 2), (2, 3)], 3)
    state = alloc.init(params)
    for step in range(4):
        state = alloc.update(state, step, params, make_params(rng, [(3, 2), (2, 3)], 3))
    assert not state.apply  # deltaT=100: no masking in the budgeting phase
    emas = state.ema_sensitivity
    state = alloc.update(state, 4, params, make_params(rng, [(3, 2), (2, 3)], 3))
    assert state.finalized and [int(m.sum()) for m in state.masks] != []
    assert sum(int(m.sum()) for m in state.masks) == 2
    assert emas  # final allocation happened from the EMAs of steps 0..3
    after = alloc.update(state, 5, params, make_params(rng, [(3, 2), (2, 3)], 3))
    assert after.apply and all((a == b).all() for a, b in zip(after.masks, state.masks))


def test_all_zero_gradients_keep_exact_budget() -> None:
    alloc = rank_allocator(target_r=1, tinit=0, tfinal=0, total_step=4)
    params = [Triplet(np.ones((3, 2)), np.ones((3, 1)), np.ones((2, 3)))] * 2
    zeros = [Triplet(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros((2, 3)))] * 2
    state = alloc.init(params)
    for step in range(5):
        state = alloc.update(state, step, params, zeros)
        if state.apply:
            assert sum(int(m.sum()) for m in state.masks) == state.budget


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_skips_update_and_counts(bad: float) -> None:
    rng = np.random.default_rng(1)
    alloc = rank_allocator(target_r=1, tinit=0, tfinal=0, total_step=10)
    params = make_params(rng, [(3, 2)], 2)
    state = alloc.update(alloc.init(params), 0, params, make_params(rng, [(3, 2)], 2))
    grads = make_params(rng, [(3, 2)], 2)
    grads[0].B[0, 0] = bad
    new = alloc.update(state, 1, params, grads)
    assert new.skipped_steps == 1
    for a, b in zip(new.ema_sensitivity[0], state.ema_sensitivity[0]):
        np.testing.assert_array_equal(a, b)
    assert sum(int(m.sum()) for m in new.masks) == new.budget


def test_steps_must_increase() -> None:
    rng = np.random.default_rng(2)
    alloc = rank_allocator(target_r=1, tinit=0, tfinal=0, total_step=10)
    params = make_params(rng, [(3, 2)], 2)
    state = alloc.update(alloc.init(params), 3, params, params)
    with pytest.raises(ValueError, match="does not follow the last step 3"):
        alloc.update(state, 3, params, params)
    with pytest.raises(ValueError, match="step must be >= 0"):
        alloc.update(state, -1, params, params)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(total_step=None), "total_step is None"),
        (dict(tinit=10), "tinit .* must be smaller"),
        (dict(beta1=1.0), "beta1 must lie strictly between 0 and 1"),
        (dict(deltaT=0), "deltaT must be"),
        (dict(target_r=-1), "target_r must be"),
    ],
)
def test_invalid_settings_fail_at_construction(kw: dict, message: str) -> None:
    base = dict(target_r=2, tinit=0, tfinal=0, total_step=10)
    with pytest.raises(ValueError, match=message):
        rank_allocator(**{**base, **kw})


def test_target_above_init_rank_fails_at_init() -> None:
    alloc = rank_allocator(target_r=5, tinit=0, tfinal=0, total_step=10)
    with pytest.raises(ValueError, match="lower target_r"):
        alloc.init(make_params(np.random.default_rng(0), [(2, 2)], 4))


def test_state_is_a_namedtuple_with_documented_fields() -> None:
    assert AllocatorState._fields == (
        "step",
        "ema_sensitivity",
        "ema_uncertainty",
        "masks",
        "budget",
        "apply",
        "finalized",
        "skipped_steps",
    )


def test_import_does_not_pull_torch() -> None:
    code = "import sys, adalora_core; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
