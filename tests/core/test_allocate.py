"""Properties of the exact top-k allocation and rank-pattern helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adalora_core import (
    allocate,
    count_parameters,
    count_ranks,
    masks_from_rank_pattern,
    masks_to_rank_pattern,
)

# few distinct values so that ties are common
tie_prone = st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 10, allow_nan=False)


@st.composite
def scores_and_budget(draw: st.DrawFn) -> tuple[list[np.ndarray], int]:
    n = draw(st.integers(1, 6))
    scores = [
        draw(arrays(np.float64, draw(st.integers(1, 8)), elements=tie_prone)) for _ in range(n)
    ]
    budget = draw(st.integers(0, sum(s.size for s in scores)))
    return scores, budget


@given(scores_and_budget())
def test_keeps_exactly_budget_and_every_kept_beats_every_dropped(data) -> None:
    scores, budget = data
    masks = allocate(scores, budget)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == bool for m in masks)
    assert sum(int(m.sum()) for m in masks) == budget
    kept = np.concatenate([s[m] for s, m in zip(scores, masks)])
    dropped = np.concatenate([s[~m] for s, m in zip(scores, masks)])
    if kept.size and dropped.size:
        assert kept.min() >= dropped.max()
        # every triplet strictly above every dropped one is kept
        flat = np.concatenate(scores)
        flat_keep = np.concatenate(masks)
        assert flat_keep[flat > dropped.max()].all()


@given(scores_and_budget())
def test_is_deterministic_and_does_not_mutate(data) -> None:
    scores, budget = data
    pristine = copy.deepcopy(scores)
    first = allocate(scores, budget)
    for s, p in zip(scores, pristine):  # the caller's arrays are unchanged
        np.testing.assert_array_equal(s, p)
    second = allocate(copy.deepcopy(pristine), budget)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_ties_break_towards_earlier_positions() -> None:
    # PEFT's `score <= kthvalue` would drop all five here and keep nothing
    masks = allocate([np.zeros(3), np.zeros(2)], 3)
    assert [m.tolist() for m in masks] == [[True, True, True], [False, False]]
    masks = allocate([np.array([1.0, 2.0]), np.array([2.0, 1.0])], 2)
    assert [m.tolist() for m in masks] == [[False, True], [True, False]]


def test_nan_scores_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"NaN triplet scores in matrices \[1\]"):
        allocate([np.ones(2), np.array([np.nan, 1.0])], 1)


@pytest.mark.parametrize("budget", [-1, 5, 2.5, True])
def test_budget_outside_range_is_an_error(budget) -> None:
    with pytest.raises(ValueError, match="budget must"):
        allocate([np.ones(2), np.ones(2)], budget)


def test_infinite_scores_rank_first() -> None:
    masks = allocate([np.array([1.0, np.inf]), np.array([-np.inf, 0.0])], 1)
    assert [m.tolist() for m in masks] == [[False, True], [False, False]]


def test_rank_pattern_round_trip() -> None:
    names = ["a.lora_E", "b.lora_E"]
    masks = [np.array([True, False, True]), np.array([False, False])]
    pattern = masks_to_rank_pattern(names, masks)
    assert pattern == {"a.lora_E": [True, False, True], "b.lora_E": [False, False]}
    back = masks_from_rank_pattern(pattern, names, ranks=[3, 2])
    for m, b in zip(masks, back):
        np.testing.assert_array_equal(m, b)
    assert count_ranks(masks) == [2, 0]
    assert count_parameters([(5, 4), (3, 3)], masks) == [2 * 10, 0]


def test_rank_pattern_missing_module_keeps_all_and_mismatch_fails() -> None:
    names = ["a", "b"]
    back = masks_from_rank_pattern({"a": [True, False]}, names, ranks=[2, 3])
    assert back[1].tolist() == [True, True, True]
    with pytest.raises(ValueError, match="has 2 entries but the module has rank 4"):
        masks_from_rank_pattern({"a": [True, False]}, names, ranks=[4, 3])
    with pytest.raises(ValueError, match="not adapted"):
        masks_from_rank_pattern({"zzz": [True]}, names, ranks=[2, 3])
