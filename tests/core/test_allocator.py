"""The functional allocator: phases, exact budgets, non-finite gradients, no mutation."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_core import (
    AllocatorState,
    Triplet,
    allocate,
    budget_schedule,
    element_score,
    rank_allocator,
    triplet_scores,
    update_importance,
)


def make_params(rng: np.random.Generator, shapes: list[tuple[int, int]], r: int) -> list[Triplet]:
    return [
        Triplet(rng.normal(size=(r, i)), rng.normal(size=(r, 1)), rng.normal(size=(o, r)))
        for o, i in shapes
    ]


def assert_same(a: object, b: object) -> None:
    """``a`` and ``b`` are equal, arrays bitwise, through tuples, lists and named tuples."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


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
        pristine = copy.deepcopy((state, params, grads))
        state = alloc.update(state, step, params, grads)
        # nothing the caller passed changed: the old state, the params, the gradients
        assert_same(before, pristine[0])
        assert_same(params, pristine[1])
        assert_same(grads, pristine[2])
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
    shapes, r, beta = [(3, 2), (2, 3)], 3, 0.85
    rng = np.random.default_rng(0)
    alloc = rank_allocator(target_r=1, tinit=0, tfinal=2, total_step=6, deltaT=100)
    params = make_params(rng, shapes, r)
    state = alloc.init(params)
    for step in range(4):
        state = alloc.update(state, step, params, make_params(rng, shapes, r))
    assert not state.apply and not state.finalized  # deltaT=100: no masking while budgeting

    def scores(ema_s: Sequence[Triplet], ema_u: Sequence[Triplet]) -> list[np.ndarray]:
        return [
            triplet_scores(*(element_score(s, u) for s, u in zip(ts, tu)))
            for ts, tu in zip(ema_s, ema_u)
        ]

    # the final allocation (step 4 = total_step - tfinal) keeps the best target_r * 2 triplets
    # by the EMAs of steps 0..3
    expected = allocate(scores(state.ema_sensitivity, state.ema_uncertainty), 2)
    # step 4's gradients are huge on exactly the triplets that lose: folded into the EMAs, they
    # would win
    grads = [
        Triplet(1e6 * ~m[:, None] * p.A, 1e6 * ~m[:, None] * p.E, 1e6 * ~m[None, :] * p.B)
        for m, p in zip(expected, params)
    ]
    folded = [
        [update_importance(s, u, x, g, beta, beta) for s, u, x, g in zip(ts, tu, p, gr)]
        for ts, tu, p, gr in zip(state.ema_sensitivity, state.ema_uncertainty, params, grads)
    ]
    wrong = allocate(
        scores(
            [Triplet(*(su[0] for su in m)) for m in folded],
            [Triplet(*(su[1] for su in m)) for m in folded],
        ),
        2,
    )
    assert any((a != b).any() for a, b in zip(wrong, expected))  # the case tells them apart
    final = alloc.update(state, 4, params, grads)
    assert final.finalized and final.apply and final.budget == 2
    assert [m.tolist() for m in final.masks] == [m.tolist() for m in expected]
    assert final.ema_sensitivity == () and final.ema_uncertainty == ()
    # after it, gradients change nothing: the final masks stay
    after = alloc.update(final, 5, params, make_params(rng, shapes, r))
    assert after.apply and [m.tolist() for m in after.masks] == [m.tolist() for m in expected]


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
