"""A functional rank allocator: ``init`` and ``update`` over an explicit state.

The pair follows optax's ``GradientTransformation``: ``rank_allocator(...)`` captures the
hyperparameters, ``init(params)`` builds the state, ``update(state, step, params, grads)``
returns a new state and never mutates the old one. After every ``update`` with
``state.apply`` set, the caller zeroes ``E[~mask]`` of every matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ._allocate import allocate
from ._importance import element_score, gradient_is_finite, triplet_scores, update_importance
from ._schedule import budget_schedule, require_total_step, validate_betas, validate_schedule

__all__ = ["Allocator", "AllocatorState", "Triplet", "rank_allocator"]


class Triplet(NamedTuple):
    """The three SVD factors of one adapted matrix (parameters, gradients or EMAs)."""

    A: np.ndarray  # shape=(r, in_features)
    E: np.ndarray  # shape=(r, 1) or (r,)
    B: np.ndarray  # shape=(out_features, r)


class AllocatorState(NamedTuple):
    """Everything needed to resume allocation exactly."""

    step: int  # last step given to update; -1 before the first
    ema_sensitivity: tuple[Triplet, ...]  # Ī per matrix, shapes of the params; () once final
    ema_uncertainty: tuple[Triplet, ...]  # Ū per matrix, shapes of the params; () once final
    masks: tuple[np.ndarray, ...]  # shape=(r_m,), bool: the current keep-mask per matrix
    budget: int  # number of triplets the schedule allows at `step`
    apply: bool  # whether the caller must zero E[~mask] after this step
    finalized: bool  # final allocation done; importance state dropped
    skipped_steps: int  # importance updates skipped for non-finite gradients


class Allocator(NamedTuple):
    """``init(params) -> state`` and ``update(state, step, params, grads) -> state``."""

    init: Callable[[Sequence[Triplet]], AllocatorState]
    update: Callable[[AllocatorState, int, Sequence[Triplet], Sequence[Triplet]], AllocatorState]


def _as_array(x: object, what: str) -> np.ndarray:
    # any array-like (NumPy, JAX, ...) as a NumPy array of a real floating dtype; JAX's
    # bfloat16 (an ml_dtypes type NumPy does not count as floating) widens exactly to float32
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":
        return a.astype(np.float32)
    if a.dtype.kind != "f":
        raise ValueError(
            f"{what} has dtype {a.dtype}: pass floating arrays (float16, bfloat16, float32 or "
            "float64), the parameters and gradients themselves."
        )
    return a


def as_triplet(t: Sequence[object], what: str = "triplet") -> Triplet:
    """``t`` (three array-likes: NumPy, JAX, ...) as a ``Triplet`` of floating NumPy arrays
    shaped A ``(r, in)``, E ``(r,)`` or ``(r, 1)``, B ``(out, r)`` with one rank ``r``
    (bfloat16 widened exactly to float32); ``ValueError`` naming ``what`` otherwise.

    >>> import numpy as np
    >>> as_triplet((np.ones((2, 3)), np.zeros(2), np.ones((4, 2)))).E.shape
    (2,)
    """
    if len(t) != 3:
        raise ValueError(f"{what} must be (A, E, B) (a Triplet), got {len(t)} arrays.")
    a, e, b = (_as_array(x, f"{what}.{n}") for x, n in zip(t, "AEB"))
    r = a.shape[0] if a.ndim == 2 else -1
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or e.shape not in ((r,), (r, 1)):
        raise ValueError(
            f"{what} has shapes A {a.shape}, E {e.shape}, B {b.shape}: expected A (r, in), "
            "E (r,) or (r, 1) and B (out, r) with one rank r."
        )
    return Triplet(a, e, b)


def _check_shapes(got: Triplet, want: Triplet, what: str, of: str) -> None:
    if any(x.shape != y.shape for x, y in zip(got, want)):
        shapes = ", ".join(f"{n} {x.shape}" for n, x in zip("AEB", got))
        expected = ", ".join(f"{n} {y.shape}" for n, y in zip("AEB", want))
        raise ValueError(f"{what} has shapes {shapes} but {of} has {expected}.")


def rank_allocator(
    *,
    target_r: int,
    tinit: int,
    tfinal: int,
    total_step: int | None,
    deltaT: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> Allocator:
    """The AdaLoRA allocator as a pair of pure functions.

    Per step (``update``), following docs/design.md:

    1) ``step < total_step - tfinal``: fold ``|p·g|`` of every A, E, B into the two EMAs
       (skipped, and counted in ``skipped_steps``, if any gradient is non-finite); if the
       schedule masks at this step, keep the ``budget`` best triplets.
    2) ``step == total_step - tfinal`` (or the first step past it): final allocation to
       ``target_r * n_matrices``, drop the EMAs.
    3) after it: keep the final masks; ``apply`` stays set so the caller re-zeroes E.

    Raises ``ValueError`` at construction for settings that cannot work and in ``update``
    for a negative step or one that does not increase.
    """
    validate_betas(beta1, beta2)
    validate_schedule(
        init_budget=0,
        target_budget=0,
        tinit=tinit,
        tfinal=tfinal,
        total_step=require_total_step(total_step),
        deltaT=deltaT,
    )
    assert total_step is not None  # required above
    if isinstance(target_r, bool) or not isinstance(target_r, (int, np.integer)) or target_r < 0:
        raise ValueError(f"target_r must be an integer >= 0, got {target_r!r}.")
    final_step = total_step - tfinal

    def budgets(masks: Sequence[np.ndarray]) -> tuple[int, int]:
        init_budget = int(sum(m.shape[0] for m in masks))
        return init_budget, target_r * len(masks)

    def init(params: Sequence[Triplet]) -> AllocatorState:
        params = [as_triplet(p, f"params[{m}]") for m, p in enumerate(params)]
        if not params:
            raise ValueError("rank_allocator.init needs at least one adapted matrix.")
        masks = tuple(np.ones(p.E.reshape(-1).shape[0], dtype=bool) for p in params)
        init_budget, target_budget = budgets(masks)
        validate_schedule(
            init_budget=init_budget,
            target_budget=target_budget,
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_step,
            deltaT=deltaT,
        )
        zeros = tuple(Triplet(*(np.zeros_like(x, dtype=np.float64) for x in p)) for p in params)
        return AllocatorState(
            step=-1,
            ema_sensitivity=zeros,
            ema_uncertainty=zeros,
            masks=masks,
            budget=init_budget,
            apply=False,
            finalized=False,
            skipped_steps=0,
        )

    def scores(state: AllocatorState) -> list[np.ndarray]:
        return [
            triplet_scores(*(element_score(s, u) for s, u in zip(ts, tu)))
            for ts, tu in zip(state.ema_sensitivity, state.ema_uncertainty)
        ]

    def update(
        state: AllocatorState, step: int, params: Sequence[Triplet], grads: Sequence[Triplet]
    ) -> AllocatorState:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step <= state.step:
            raise ValueError(
                f"step {step} does not follow the last step {state.step}: call update once per "
                "optimizer step with an increasing step (resume from the saved state instead "
                "of replaying steps)."
            )
        init_budget, target_budget = budgets(state.masks)
        kw = dict(
            init_budget=init_budget,
            target_budget=target_budget,
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_step,
            deltaT=deltaT,
        )
        # 3) after the final allocation: keep re-applying the recorded pattern
        if state.finalized:
            return state._replace(step=step, budget=target_budget, apply=True)
        if len(params) != len(state.masks) or len(grads) != len(state.masks):
            raise ValueError(
                f"expected {len(state.masks)} matrices, got {len(params)} params and "
                f"{len(grads)} grads."
            )
        params = [as_triplet(p, f"params[{m}]") for m, p in enumerate(params)]
        grads = [as_triplet(g, f"grads[{m}]") for m, g in enumerate(grads)]
        for m, (p, g, ema_p) in enumerate(zip(params, grads, state.ema_sensitivity)):
            _check_shapes(p, ema_p, f"params[{m}]", "the matrix given to init")
            _check_shapes(g, p, f"grads[{m}]", f"params[{m}]")
        ema_s, ema_u, skipped = state.ema_sensitivity, state.ema_uncertainty, state.skipped_steps
        # 1) importance, only before the final phase
        if step < final_step:
            finite = all(
                gradient_is_finite(x, g) for p, gr in zip(params, grads) for x, g in zip(p, gr)
            )
            if finite:
                new = [
                    [
                        update_importance(s, u, x, g, beta1, beta2)
                        for s, u, x, g in zip(ts, tu, p, gr)
                    ]
                    for ts, tu, p, gr in zip(ema_s, ema_u, params, grads)
                ]
                ema_s = tuple(Triplet(*(su[0] for su in m)) for m in new)
                ema_u = tuple(Triplet(*(su[1] for su in m)) for m in new)
            else:
                skipped += 1
        state = state._replace(ema_sensitivity=ema_s, ema_uncertainty=ema_u, skipped_steps=skipped)
        # 2) final allocation at the first step at or past total_step - tfinal
        if step >= final_step:
            masks = tuple(allocate(scores(state), target_budget))
            return state._replace(
                step=step,
                ema_sensitivity=(),
                ema_uncertainty=(),
                masks=masks,
                budget=target_budget,
                apply=True,
                finalized=True,
            )
        budget, mask_now = budget_schedule(step, **kw)
        masks = tuple(allocate(scores(state), budget)) if mask_now else state.masks
        return state._replace(step=step, masks=masks, budget=budget, apply=mask_now)

    return Allocator(init, update)
