"""Sensitivity-based importance of every adapter entry, smoothed and with its uncertainty.

Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512, eqs. (8)-(11):
``I = |p * g|``, ``Ī ← β1·Ī + (1-β1)·I``, ``Ū ← β2·Ū + (1-β2)·|I - Ī|``, ``s = Ī·Ū``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["element_score", "ema", "gradient_is_finite", "triplet_scores", "update_importance"]


def ema(average: np.ndarray, value: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average ``beta * average + (1 - beta) * value`` (a new array)."""
    return beta * average + (1.0 - beta) * value


def gradient_is_finite(param: np.ndarray, grad: np.ndarray) -> bool:
    """Whether the sensitivity ``|param * grad|`` is finite everywhere."""
    with np.errstate(all="ignore"):
        return bool(np.isfinite(np.asarray(param) * np.asarray(grad)).all())


def update_importance(
    ema_sensitivity: np.ndarray,
    ema_uncertainty: np.ndarray,
    param: np.ndarray,
    grad: np.ndarray,
    beta1: float,
    beta2: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of the two importance EMAs for one parameter; the inputs are not modified.

    ``I = |param * grad|``; ``Ī' = β1·Ī + (1-β1)·I``; ``Ū' = β2·Ū + (1-β2)·|I - Ī'|``
    (the uncertainty uses the already updated ``Ī'``, as the reference implementation does).

    A non-finite sensitivity (an fp16 overflow, a skipped optimizer step) must never enter
    the averages: in that case copies of the old EMAs are returned unchanged. Check
    :func:`gradient_is_finite` first to know whether the step counted;
    :func:`adalora_core.rank_allocator` does so for all matrices together and counts the
    skipped steps in its state.

    >>> s, u = update_importance(np.zeros(2), np.zeros(2), np.array([1., -2.]),
    ...                          np.array([3., 1.]), 0.5, 0.5)
    >>> s.tolist(), u.tolist()
    ([1.5, 1.0], [0.75, 0.5])
    """
    if not gradient_is_finite(param, grad):
        return np.array(ema_sensitivity, copy=True), np.array(ema_uncertainty, copy=True)
    sensitivity = np.abs(np.asarray(param) * np.asarray(grad))
    new_sensitivity = ema(ema_sensitivity, sensitivity, beta1)
    new_uncertainty = ema(ema_uncertainty, np.abs(sensitivity - new_sensitivity), beta2)
    return new_sensitivity, new_uncertainty


def element_score(ema_sensitivity: np.ndarray, ema_uncertainty: np.ndarray) -> np.ndarray:
    """Score of every entry: ``s = Ī · Ū``."""
    return ema_sensitivity * ema_uncertainty


def triplet_scores(score_A: np.ndarray, score_E: np.ndarray, score_B: np.ndarray) -> np.ndarray:
    """One score per triplet ``i`` of a matrix, from its element scores.

    ``S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``, with ``score_A`` of shape
    ``(r, in)``, ``score_E`` of shape ``(r,)`` or ``(r, 1)`` and ``score_B`` of shape
    ``(out, r)``. Returns shape ``(r,)``.

    >>> triplet_scores(np.ones((2, 3)), np.array([[1.], [2.]]), np.full((4, 2), 2.)).tolist()
    [4.0, 5.0]
    """
    score_A = np.asarray(score_A)
    score_B = np.asarray(score_B)
    score_E = np.asarray(score_E).reshape(-1)
    r = score_E.shape[0]
    if score_A.ndim != 2 or score_A.shape[0] != r or score_B.ndim != 2 or score_B.shape[1] != r:
        raise ValueError(
            f"triplet_scores expects A (r, in), E (r,) and B (out, r) with one r; got A "
            f"{score_A.shape}, E {score_E.shape}, B {score_B.shape}."
        )
    # summed as the reference implementation does: E + (mean A + mean B)
    return score_E + (score_A.mean(axis=1) + score_B.mean(axis=0))
