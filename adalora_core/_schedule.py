"""The global rank budget over training: warm-up, cubic decrease, final phase.

Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512, eq. (12).
"""

from __future__ import annotations

import numpy as np

__all__ = ["budget_schedule", "require_total_step", "validate_betas", "validate_schedule"]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_schedule(
    *,
    init_budget: int,
    target_budget: int,
    tinit: int,
    tfinal: int,
    total_step: int | None,
    deltaT: int,
) -> None:
    """Raise ``ValueError`` (with what to change) when schedule arguments cannot work.

    Checks: ``tinit, tfinal >= 0``; ``deltaT >= 1``; ``0 <= target_budget <= init_budget``;
    and, once ``total_step`` is known (None means "not known yet", e.g. until a ``Trainer``
    callback fills it in): ``total_step`` positive and ``tinit < total_step - tfinal`` (a
    budgeting phase of at least one step). The budgets count triplets (``init_r`` and
    ``target_r`` times the number of adapted matrices; a config, which does not know that
    number yet, passes ``init_r`` and ``target_r`` themselves). This function is the one place
    these rules and their messages live; every layer (config, allocators, model) calls it.
    """
    named = (("total_step", total_step), ("tinit", tinit), ("tfinal", tfinal))
    for name, value in named:
        if not _is_int(value) and not (name == "total_step" and value is None):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if not _is_int(deltaT) or deltaT < 1:
        raise ValueError(
            f"deltaT must be an integer >= 1 (steps between two allocations), got {deltaT!r}."
        )
    if tinit < 0 or tfinal < 0:
        raise ValueError(
            f"tinit and tfinal must be >= 0 (numbers of steps), got tinit={tinit}, tfinal={tfinal}."
        )
    if init_budget < 0 or target_budget < 0:
        raise ValueError(
            f"budgets count triplets and must be >= 0, got init_budget={init_budget}, "
            f"target_budget={target_budget}: set target_r (and init_r) to 0 or more."
        )
    if target_budget > init_budget:
        raise ValueError(
            f"the target budget ({target_budget}, from target_r) is larger than the initial "
            f"budget ({init_budget}, from init_r): AdaLoRA only removes rank; lower target_r or "
            "raise init_r."
        )
    if total_step is None:
        return
    if total_step <= 0:
        raise ValueError(
            "total_step must be a positive integer (the number of optimizer steps of the run), "
            f"got {total_step}."
        )
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"tinit ({tinit}) must be smaller than total_step - tfinal ({total_step} - {tfinal} = "
            f"{total_step - tfinal}) so that the budget has steps to decrease in: lower tinit or "
            "tfinal, or raise total_step."
        )


def require_total_step(total_step: int | None) -> int:
    """``total_step``, or a ``ValueError`` saying how to set it when it is still None.

    >>> require_total_step(100)
    100
    """
    if total_step is None:
        raise ValueError(
            "total_step is None: set total_step to the number of optimizer steps of the run "
            "(AdaLoraConfig(total_step=N), RankAllocator(..., total_step=N) or "
            "set_total_step(N)), or train with transformers.Trainer and AdaLoraCallback, which "
            "fills it in from max_steps."
        )
    return total_step


def validate_betas(beta1: float, beta2: float) -> None:
    """Raise ``ValueError`` unless both EMA coefficients are numbers strictly between 0 and 1."""
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        real = (int, float, np.integer, np.floating)
        number = isinstance(beta, real) and not isinstance(beta, bool)
        if not number or not (0.0 < float(beta) < 1.0):
            raise ValueError(f"{name} must lie strictly between 0 and 1 (e.g. 0.85), got {beta!r}.")


def budget_schedule(
    step: int,
    *,
    init_budget: int,
    target_budget: int,
    tinit: int,
    tfinal: int,
    total_step: int | None,
    deltaT: int,
) -> tuple[int, bool]:
    """The number of triplets to keep at ``step``, and whether to mask at this step.

    1) warm-up, ``step <= tinit``: ``(init_budget, False)``.
    2) final, ``step > total_step - tfinal``: ``(target_budget, True)``.
    3) budgeting, otherwise: with ``m = 1 - (step - tinit) / (total_step - tfinal - tinit)``,
       ``budget = int((init_budget - target_budget) * m**3 + target_budget)``, masking iff
       ``step % deltaT == 0``.

    Worked example: 4 matrices of rank 12 (``init_budget=48``) shrinking to rank 8 on average
    (``target_budget=32``) with ``tinit=10, tfinal=20, total_step=100`` and steps counted
    1..100 (as ``AdaLoraCallback`` does): 10 warm-up steps (1..10), 70 budgeting steps
    (11..80, the last one reaching the target) and 20 final steps (81..100). A loop that
    counts from 0 has one more warm-up step (0..10) and ends at step 99.

    >>> kw = dict(init_budget=48, target_budget=32, tinit=10, tfinal=20, total_step=100, deltaT=1)
    >>> budget_schedule(0, **kw), budget_schedule(10, **kw)
    ((48, False), (48, False))
    >>> budget_schedule(11, **kw)
    (47, True)
    >>> budget_schedule(45, **kw)
    (34, True)
    >>> budget_schedule(80, **kw), budget_schedule(81, **kw), budget_schedule(99, **kw)
    ((32, True), (32, True), (32, True))
    >>> budget_schedule(45, **{**kw, "deltaT": 10})
    (34, False)
    """
    total_step = require_total_step(total_step)
    validate_schedule(
        init_budget=init_budget,
        target_budget=target_budget,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_step,
        deltaT=deltaT,
    )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    # 1) warm-up
    if step <= tinit:
        return init_budget, False
    # 3) final
    if step > total_step - tfinal:
        return target_budget, True
    # 2) budgeting: cubic decrease
    m = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (m**3) + target_budget)
    return budget, step % deltaT == 0
