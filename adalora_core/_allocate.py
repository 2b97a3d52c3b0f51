"""Exact top-k allocation of the rank budget, and rank-pattern bookkeeping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "allocate",
    "count_parameters",
    "count_ranks",
    "masks_from_rank_pattern",
    "masks_to_rank_pattern",
]


def allocate(scores: Sequence[np.ndarray], budget: int) -> list[np.ndarray]:
    """Keep exactly ``budget`` triplets with the highest scores over all matrices.

    ``scores[m]`` holds the triplet scores of matrix ``m`` (shape ``(r_m,)``). Returns one
    boolean keep-mask per matrix with exactly ``budget`` ``True`` entries in all, and every kept
    score is ``>=`` every dropped one.

    Tie-break (deterministic): among equal scores, the triplet that comes first in the
    concatenation ``scores[0], scores[1], ...`` (earlier matrix, then lower rank index) is
    kept. PEFT drops every score ``<=`` the k-th smallest, which over-prunes on ties (with
    all-zero scores it keeps nothing); here the count is always exact.

    >>> [m.tolist() for m in allocate([np.array([0.3, 0.1]), np.array([0.2, 0.0])], 2)]
    [[True, False], [True, False]]
    >>> [m.tolist() for m in allocate([np.zeros(3), np.zeros(2)], 2)]
    [[True, True, False], [False, False]]
    """
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    sizes = [a.shape[0] for a in arrays]
    total = int(sum(sizes))
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}.")
    if not 0 <= budget <= total:
        raise ValueError(
            f"budget must lie in [0, {total}] (the number of triplets), got {budget}: "
            "check init_r, target_r and the number of adapted matrices."
        )
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    if np.isnan(flat).any():
        bad = [i for i, a in enumerate(arrays) if np.isnan(a).any()]
        raise ValueError(
            f"NaN triplet scores in matrices {bad}: the importance state is corrupt; "
            "non-finite gradients must be skipped before they reach the averages."
        )
    # stable sort of -score: ties keep their order of appearance
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(total, dtype=bool)
    keep[order[:budget]] = True
    return list(np.split(keep, np.cumsum(sizes)[:-1])) if arrays else []


def masks_to_rank_pattern(
    names: Sequence[str], masks: Sequence[np.ndarray]
) -> dict[str, list[bool]]:
    """PEFT's ``rank_pattern`` form: module name -> list of bools (True = triplet kept).

    >>> masks_to_rank_pattern(["q.lora_E"], [np.array([True, False])])
    {'q.lora_E': [True, False]}
    """
    if len(names) != len(masks):
        raise ValueError(f"{len(names)} names for {len(masks)} masks.")
    return {n: [bool(b) for b in np.asarray(m).reshape(-1)] for n, m in zip(names, masks)}


def masks_from_rank_pattern(
    rank_pattern: Mapping[str, Sequence[bool]],
    names: Sequence[str],
    ranks: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Keep-masks in the order of ``names`` from a ``rank_pattern`` dict.

    A name missing from the pattern keeps all of its ``ranks[i]`` triplets (PEFT leaves
    modules out only when nothing was allocated yet); a pattern whose length does not match
    ``ranks[i]`` or that names an unknown module is a ``ValueError``.
    """
    unknown = sorted(set(rank_pattern) - set(names))
    if unknown:
        raise ValueError(f"rank_pattern names modules that are not adapted: {unknown[:5]}.")
    masks = []
    for i, name in enumerate(names):
        if name in rank_pattern:
            mask = np.asarray(rank_pattern[name], dtype=bool).reshape(-1)
            if ranks is not None and mask.shape[0] != ranks[i]:
                raise ValueError(
                    f"rank_pattern[{name!r}] has {mask.shape[0]} entries but the module has "
                    f"rank {ranks[i]}: the pattern belongs to another init_r or model."
                )
        else:
            if ranks is None:
                raise ValueError(f"{name!r} is missing from rank_pattern and no ranks were given.")
            mask = np.ones(ranks[i], dtype=bool)
        masks.append(mask)
    return masks


def count_ranks(masks: Sequence[np.ndarray]) -> list[int]:
    """Number of kept triplets per matrix."""
    return [int(np.count_nonzero(m)) for m in masks]


def count_parameters(shapes: Sequence[tuple[int, int]], masks: Sequence[np.ndarray]) -> list[int]:
    """Adapter parameters per matrix after shrinking: ``rank * (in + out + 1)``.

    ``shapes[m]`` is ``(out_features, in_features)`` of matrix ``m``.

    >>> count_parameters([(4, 3)], [np.array([True, False, True])])
    [16]
    """
    return [k * (o + i + 1) for (o, i), k in zip(shapes, count_ranks(masks))]
