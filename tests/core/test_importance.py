"""Properties of the importance EMAs and triplet scores (docs/design.md, "Importance:
sensitivity, uncertainty, scores")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adalora_core import element_score, ema, triplet_scores, update_importance, validate_betas

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
betas = st.floats(0.01, 0.99)


@st.composite
def param_grad_state(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    shape = draw(st.tuples(st.integers(1, 5), st.integers(1, 5)))
    p, g = (
        draw(arrays(np.float64, shape, elements=finite)),
        draw(arrays(np.float64, shape, elements=finite)),
    )
    s = np.abs(draw(arrays(np.float64, shape, elements=finite)))
    u = np.abs(draw(arrays(np.float64, shape, elements=finite)))
    return p, g, s, u


@given(param_grad_state(), betas, betas)
def test_emas_are_non_negative_and_inputs_untouched(data, beta1: float, beta2: float) -> None:
    p, g, s, u = data
    copies = [x.copy() for x in data]
    new_s, new_u = update_importance(s, u, p, g, beta1, beta2)
    assert (new_s >= 0).all() and (new_u >= 0).all()
    for x, c in zip(data, copies):
        np.testing.assert_array_equal(x, c)


@given(param_grad_state(), betas, betas)
def test_update_matches_formula(data, beta1: float, beta2: float) -> None:
    p, g, s, u = data
    new_s, new_u = update_importance(s, u, p, g, beta1, beta2)
    i = np.abs(p * g)
    expected_s = beta1 * s + (1 - beta1) * i
    np.testing.assert_allclose(new_s, expected_s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        new_u, beta2 * u + (1 - beta2) * np.abs(i - expected_s), rtol=1e-12, atol=1e-9
    )


@given(st.floats(0.0, 100.0), betas, betas)
def test_constant_importance_converges_to_itself(value: float, beta1: float, beta2: float) -> None:
    p, g = np.full((2, 3), value), np.ones((2, 3))
    s, u = np.zeros((2, 3)), np.zeros((2, 3))
    for _ in range(3000):
        s, u = update_importance(s, u, p, g, beta1, beta2)
    np.testing.assert_allclose(s, value, rtol=1e-6, atol=1e-9)
    # the uncertainty of a constant signal vanishes
    np.testing.assert_allclose(u, 0.0, atol=1e-6 * max(value, 1.0))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_gradient_leaves_state_unchanged(bad: float) -> None:
    s, u = np.full((2, 2), 0.5), np.full((2, 2), 0.25)
    g = np.ones((2, 2))
    g[1, 0] = bad
    new_s, new_u = update_importance(s, u, np.ones((2, 2)), g, 0.85, 0.85)
    np.testing.assert_array_equal(new_s, s)
    np.testing.assert_array_equal(new_u, u)
    assert new_s is not s and new_u is not u


def test_ema_is_one_formula() -> None:
    assert ema(np.array(2.0), np.array(4.0), 0.25) == pytest.approx(3.5)


@st.composite
def score_shapes(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    pos = st.floats(0, 1e3, allow_nan=False, width=64)
    e_shape = draw(st.sampled_from([(r,), (r, 1)]))
    return (
        draw(arrays(np.float64, (r, n_in), elements=pos)),
        draw(arrays(np.float64, e_shape, elements=pos)),
        draw(arrays(np.float64, (n_out, r), elements=pos)),
    )


@given(score_shapes())
def test_triplet_scores_equal_design_formula(scores) -> None:
    a, e, b = scores
    got = triplet_scores(a, e, b)
    r = a.shape[0]
    expected = [
        e.reshape(-1)[i] + a[i, :].sum() / a.shape[1] + b[:, i].sum() / b.shape[0] for i in range(r)
    ]
    assert got.shape == (r,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)


def test_triplet_scores_rejects_mismatched_ranks() -> None:
    with pytest.raises(ValueError, match="one r"):
        triplet_scores(np.ones((2, 3)), np.ones(3), np.ones((4, 2)))


def test_element_score_is_product() -> None:
    np.testing.assert_array_equal(element_score(np.array([2.0]), np.array([3.0])), [6.0])


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_betas_outside_open_interval_or_not_numbers_fail(beta: object) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validate_betas(beta, 0.85)
    with pytest.raises(ValueError, match="beta2 must lie"):
        validate_betas(0.85, beta)
