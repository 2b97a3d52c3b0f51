"""Properties of the budget schedule (docs/design.md, "Budget schedule: three phases")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adalora_core import budget_schedule, require_total_step, validate_schedule


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, int]:
    total_step = draw(st.integers(2, 400))
    tfinal = draw(st.integers(0, total_step - 1))
    tinit = draw(st.integers(0, total_step - tfinal - 1))
    init_budget = draw(st.integers(0, 500))
    target_budget = draw(st.integers(0, init_budget))
    deltaT = draw(st.integers(1, 20))
    return dict(
        init_budget=init_budget,
        target_budget=target_budget,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_step,
        deltaT=deltaT,
    )


@given(schedules())
def test_budget_is_non_increasing_and_within_bounds(kw: dict[str, int]) -> None:
    budgets = [budget_schedule(s, **kw)[0] for s in range(kw["total_step"] + 5)]
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:]))
    assert all(kw["target_budget"] <= b <= kw["init_budget"] for b in budgets)


@given(schedules())
def test_phase_edges(kw: dict[str, int]) -> None:
    tinit, tfinal, total = kw["tinit"], kw["tfinal"], kw["total_step"]
    for step in range(tinit + 1):
        assert budget_schedule(step, **kw) == (kw["init_budget"], False)
    # the last budgeting step (m = 0) and every final step reach the target
    assert budget_schedule(total - tfinal, **kw)[0] == kw["target_budget"]
    for step in range(total - tfinal + 1, total + 3):
        assert budget_schedule(step, **kw) == (kw["target_budget"], True)


@given(schedules())
def test_masking_in_budgeting_phase_exactly_on_multiples_of_deltaT(kw: dict[str, int]) -> None:
    for step in range(kw["tinit"] + 1, kw["total_step"] - kw["tfinal"] + 1):
        assert budget_schedule(step, **kw)[1] == (step % kw["deltaT"] == 0)


def test_cubic_formula_at_midpoint() -> None:
    kw = dict(init_budget=100, target_budget=20, tinit=0, tfinal=0, total_step=10, deltaT=1)
    # m = 1 - 5 / 10 = 0.5 -> 80 * 0.125 + 20 = 30
    assert budget_schedule(5, **kw) == (30, True)


BASE = dict(init_budget=48, target_budget=32, tinit=10, tfinal=20, total_step=100, deltaT=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(tinit=80), "tinit .* must be smaller than total_step - tfinal"),
        (dict(tfinal=100), "must be smaller than total_step - tfinal"),
        (dict(target_budget=49), "lower target_r or raise init_r"),
        (dict(target_budget=-1), r"set target_r \(and init_r\) to 0 or more"),
        (dict(deltaT=0), "deltaT must be an integer >= 1"),
        (dict(total_step=0), "total_step must be a positive integer"),
        (dict(tinit=-1), "must be >= 0"),
        (dict(tinit=1.5), "tinit must be an integer"),
    ],
)
def test_invalid_schedules_say_what_to_change(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_schedule(**{**BASE, **change})
    with pytest.raises(ValueError, match=message):
        budget_schedule(50, **{**BASE, **change})


def test_unknown_total_step_checks_the_rest_and_the_step_needs_it() -> None:
    # None means "not known yet": the rules that need it wait, the others still apply
    validate_schedule(**{**BASE, "total_step": None, "tinit": 500})
    with pytest.raises(ValueError, match="lower target_r"):
        validate_schedule(**{**BASE, "total_step": None, "target_budget": 49})
    with pytest.raises(ValueError, match="total_step is None: set total_step"):
        budget_schedule(50, **{**BASE, "total_step": None})
    with pytest.raises(ValueError, match="total_step is None: set total_step"):
        require_total_step(None)


def test_negative_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        budget_schedule(-1, **BASE)
