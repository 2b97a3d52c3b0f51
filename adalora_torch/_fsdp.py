"""The rank allocator under FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded state.

Every process holds a slice of each A, E and B and of its gradient (``DTensor``). ``|p · g|``
and the EMAs are element-wise, so each process keeps them for its own slices
(``ShardedBucket``, which ``RankAllocator`` uses for ``DTensor`` parameters); only the triplet
score needs a whole row of A and column of B. :func:`sharded_triplet_scores` adds up each
process's part of it in a vector of ``Σ r`` floats and all-reduces that vector: weights are
never gathered. Several nodes change nothing here: the process group spans them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from ._buckets import EmaBuffers, Triplet, ema_dtype

__all__ = ["ShardedBucket", "is_sharded", "sharded_triplet_scores"]


def _dtensor_types() -> tuple[Any, Any, Any]:
    from torch.distributed.tensor import DTensor, Replicate, Shard  # torch >= 2.5

    return DTensor, Replicate, Shard


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 ``fully_shard``)."""
    # no DTensor can exist before its module is imported (importing it takes about 0.5 s)
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _layout(t: Any, mesh: Any) -> tuple[torch.Tensor, Any, list[Any]]:
    """``(local slice, mesh, placements)``; a plain tensor is whole and replicated on ``mesh``."""
    dtensor, replicate, shard = _dtensor_types()
    if isinstance(t, dtensor):
        placements = list(t.placements)
        for p in placements:
            if not isinstance(p, (replicate, shard)):
                raise ValueError(
                    f"Adapter tensors must be sharded (Shard) or replicated (Replicate) on each "
                    f"mesh dimension, got {p!r}."
                )
        return t.to_local(), t.device_mesh, placements
    return t, mesh, [] if mesh is None else [replicate() for _ in range(mesh.ndim)]


def _local_range(size: int, mesh: Any, placements: Sequence[Any], dim: int) -> tuple[int, int]:
    """``(start, length)`` of this process's slice of tensor dimension ``dim`` (of ``size``
    entries), split as ``torch.chunk`` splits it (FSDP2's and DTensor's ``Shard(dim)``),
    nested in mesh-dimension order when several mesh dimensions shard it."""
    _, _, shard = _dtensor_types()
    start, length = 0, size
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, shard) and placement.dim == dim:
            n, k = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            chunk = -(-length // n)  # ceil
            lo = min(k * chunk, length)
            start, length = start + lo, min(lo + chunk, length) - lo
    return start, length


def _counts_here(mesh: Any, placements: Sequence[Any]) -> bool:
    """A replicated slice is counted once: on the first process of each replicating mesh dim."""
    _, replicate, _ = _dtensor_types()
    return all(
        mesh.get_local_rank(d) == 0 for d, p in enumerate(placements) if isinstance(p, replicate)
    )


def _local_slice(full: Any, mesh: Any, placements: Sequence[Any]) -> torch.Tensor:
    """This process's slice of a whole tensor laid out as ``placements`` on ``mesh``."""
    for dim in range(full.dim()):
        start, length = _local_range(full.shape[dim], mesh, placements, dim)
        full = full.narrow(dim, start, length)
    return full


class _Part(NamedTuple):
    """How one local slice adds to the triplet scores: its sum over dimension ``other``,
    divided by ``n_other``, goes to ``out[lo:hi]``; nothing when ``counts`` is False or the
    slice is empty."""

    counts: bool
    other: int
    n_other: int
    lo: int
    hi: int


def _part(shape: Sequence[int], kind: int, offset: int, mesh: Any, placements: Any) -> _Part:
    # kind 0, 1, 2: A (r, in), E (r, 1), B (out, r); E is read as (r, -1)
    rank_dim = 1 if kind == 2 else 0
    other = 1 - rank_dim
    n_other = int(np.prod(shape[1:])) if kind == 1 else int(shape[other])
    start, length = (0, int(shape[rank_dim]))
    if mesh is not None:
        start, length = _local_range(int(shape[rank_dim]), mesh, placements, rank_dim)
    counts = mesh is None or _counts_here(mesh, placements)
    return _Part(counts, other, max(n_other, 1), offset + start, offset + start + length)


def _add_part(out: torch.Tensor, local: torch.Tensor, part: _Part) -> None:
    if not part.counts or part.hi == part.lo or local.numel() == 0:
        return
    local = local.reshape(local.shape[0], -1)  # E (r,) -> (r, 1); A, B are 2-D already
    out[part.lo : part.hi] += local.sum(dim=part.other).to(out.dtype) / part.n_other


def _all_reduce(t: torch.Tensor, mesh: Any, op: Any = None) -> None:
    """Reduce ``t`` over the whole mesh: one all-reduce per mesh dimension (a sum or a min over
    every process, since both are separable)."""
    op = torch.distributed.ReduceOp.SUM if op is None else op
    for mesh_dim in range(mesh.ndim):
        torch.distributed.all_reduce(t, op=op, group=mesh.get_group(mesh_dim))


def sharded_triplet_scores(
    element_scores: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Triplet scores of matrices whose element scores are sharded across processes.

    ``element_scores[m]`` holds the element scores ``s = Ī·Ū`` of matrix ``m``: A
    ``(r, in)``, E ``(r, 1)`` (or ``(r,)``) and B ``(out, r)``, each a ``DTensor`` laid out as
    FSDP2 (``fully_shard``) lays out the parameters, sharded along any dimension
    (``Shard(d)``, split as ``torch.chunk`` splits) or replicated (``Replicate()``) on each
    dimension of one device mesh; a plain tensor is whole and the same on every process. Every
    process of the mesh calls this with its own slices.

    Returns ``S`` (shape ``(Σ r,)``, matrices in order, the same on every process):
    ``S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``, as ``adalora_core.triplet_scores``.
    Each process writes its part of the sums into a zero vector,
    ``Σ_{j here} s(A_ij) / in + Σ_{here} s(E_i) + Σ_{k here} s(B_ki) / out`` (a replicated
    slice counts on the first process of its mesh dimension only), and one ``all_reduce`` (sum)
    per mesh dimension adds the vectors: ``Σ r`` floats travel, no element of A, E or B is
    gathered. The sums are added in another order than an unsharded mean, so ``S`` equals it
    up to rounding (and the masks drawn from it are equal unless two scores are that close).
    Without any ``DTensor`` nothing is communicated.
    """
    dtensor, _, _ = _dtensor_types()
    flat: list[Any] = [t for triplet in element_scores for t in triplet]
    meshes = {t.device_mesh for t in flat if isinstance(t, dtensor)}
    if len(meshes) > 1:
        raise ValueError("All sharded element scores must live on one device mesh.")
    mesh = next(iter(meshes)) if meshes else None
    ranks = [int(e.shape[0]) for _, e, _ in element_scores]
    if not flat:
        return torch.zeros(0)
    first = _layout(flat[0], mesh)[0]
    out = torch.zeros(sum(ranks), dtype=first.dtype, device=first.device)
    offset = 0
    for r, triplet in zip(ranks, element_scores):
        for kind, score in enumerate(triplet):
            local, _, placements = _layout(score, mesh)
            _add_part(out, local, _part(score.shape, kind, offset, mesh, placements))
        offset += r
    if mesh is not None:
        _all_reduce(out, mesh)
    return out


class ShardedBucket(EmaBuffers):
    """``RankAllocator``'s state for adapter matrices whose A, E, B are ``DTensor`` (FSDP2).

    The interface of ``adalora_torch._buckets.Bucket`` over this process's slices: the flat
    EMAs ``Ī``, ``Ū`` and the per-call workspace ``I`` hold the local slices (plus one slot,
    below), the triplet scores come from the reduction of :func:`sharded_triplet_scores` (one
    all-reduce of ``Σ r`` floats per mesh dimension, at allocation steps only), and E is masked
    on its local rows. The spec skips a step's update when any ``p · g`` is non-finite: each
    step the local finiteness flag is min-reduced over the mesh (one float) and written into
    the last slot of the workspace (0, or NaN when another process saw a non-finite value), so
    that every process skips the same steps. The EMA views handed to ``state_dict`` are
    ``DTensor`` laid out like the parameters; loading takes those or whole tensors (each
    process keeps its slice).
    """

    def __init__(
        self,
        device: torch.device,
        members: list[int],
        triplets: Sequence[Triplet],
        offsets: Sequence[int],
        weights: tuple[float, float],
        with_ema: bool,
    ) -> None:
        dtensor, _, _ = _dtensor_types()
        meshes = {cast(Any, t).device_mesh for tr in triplets for t in tr if isinstance(t, dtensor)}
        if len(meshes) != 1:
            raise ValueError(
                "RankAllocator needs the sharded adapter parameters of one device on one device "
                f"mesh, found {len(meshes)} meshes."
            )
        self.mesh = next(iter(meshes))
        self.members = members
        params = [t for tr in triplets for t in tr]  # member-major: A, E, B, A, E, B, ...
        # (shape, stride, placements, local shape) of each: the layout, not the tensors
        self.layouts = []
        for t in params:
            local, _, placements = _layout(t, self.mesh)
            self.layouts.append((t.shape, t.stride(), placements, local.shape))
        self.sizes = [int(np.prod(lay[3])) for lay in self.layouts]
        ranks = [int(tr[1].shape[0]) for tr in triplets]
        self.score_pos = np.concatenate(
            [np.arange(offsets[m], offsets[m] + r) for m, r in zip(members, ranks)]
            + [np.zeros(0, dtype=np.int64)]
        )
        self.parts: list[_Part] = []
        pos = 0
        for k, r in enumerate(ranks):
            for kind in range(3):
                shape, _, placements, _ = self.layouts[3 * k + kind]
                self.parts.append(_part(shape, kind, pos, self.mesh, placements))
            pos += r
        # local slices, then one slot for the peers' finiteness (0 or NaN)
        super().__init__(device, sum(self.sizes) + 1, ema_dtype(triplets), weights, with_ema)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The local slices of every A, E, B in a flat buffer (views)."""
        pieces = flat[: self.numel - 1].split(self.sizes)
        return [t.view(lay[3]) for t, lay in zip(pieces, self.layouts)]

    def views(self, flat: torch.Tensor, k: int) -> Triplet:
        """The A, E, B entries of the ``k``-th member in a flat buffer, as ``DTensor`` laid
        out like the parameters (views of the local slices)."""
        dtensor, _, _ = _dtensor_types()
        local = self._split(flat)[3 * k : 3 * k + 3]
        out = [
            dtensor.from_local(t, self.mesh, placements, shape=shape, stride=stride)
            for t, (shape, stride, placements, _) in zip(local, self.layouts[3 * k : 3 * k + 3])
        ]
        return out[0], out[1], out[2]

    def load_ema(self, k: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``(Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B)`` of the ``k``-th member (``DTensor`` laid
        out like the parameters, or whole tensors) into the local slices of the EMAs."""
        assert self.ema_s is not None and self.ema_u is not None
        dtensor, _, _ = _dtensor_types()
        dst = [self._split(flat)[3 * k + j] for flat in (self.ema_s, self.ema_u) for j in range(3)]
        layouts = self.layouts[3 * k : 3 * k + 3] * 2
        for d, src, (shape, _, placements, _) in zip(dst, cast(Sequence[Any], tensors), layouts):
            if isinstance(src, dtensor):
                if src.device_mesh == self.mesh and list(src.placements) == placements:
                    d.copy_(src.to_local().reshape(d.shape))
                    continue
                src = src.full_tensor()
            d.copy_(_local_slice(src.reshape(shape), self.mesh, placements))

    def sensitivity(self, triplets: Sequence[Triplet], grads: Sequence[Any]) -> torch.Tensor:
        """``I = |p · g|`` of the local slices in a new flat workspace, the peers' finiteness
        in its last slot; a None gradient counts as zero."""
        dtensor, _, _ = _dtensor_types()
        with torch.no_grad():
            params = [_layout(t, self.mesh)[0] for tr in triplets for t in tr]
            raw = [g for gr in grads for g in gr]
            local = [
                torch.zeros_like(p) if g is None else g.to_local() if isinstance(g, dtensor) else g
                for p, g in zip(params, raw)
            ]
            work = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
            torch._foreach_addcmul_(self._split(work), params, local)
            sens = work.abs_()
            ok = torch.isfinite(sens[:-1]).all().to(self.dtype).reshape(1)
            _all_reduce(ok, self.mesh, torch.distributed.ReduceOp.MIN)
            sens[-1:].copy_(torch.where(ok > 0, 0.0, float("nan")))
        return sens

    def scores(self) -> torch.Tensor:
        """Triplet scores of the bucket's matrices (``score_pos`` order), the same on every
        process: local partial sums, all-reduced over the mesh."""
        assert self.ema_s is not None and self.ema_u is not None
        s = self.ema_s * self.ema_u  # element scores Ī·Ū, local slices
        out = torch.zeros(len(self.score_pos), device=self.device, dtype=self.dtype)
        for local, part in zip(self._split(s), self.parts):
            _add_part(out, local, part)
        _all_reduce(out, self.mesh)
        return out

    def apply_masks(self, es: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
        """Multiply each E's local rows by their rows of the keep factors."""
        with torch.no_grad():
            for e, factor in zip(es, factors):
                local, mesh, placements = _layout(e, self.mesh)
                start, length = _local_range(int(e.shape[0]), mesh, placements, 0)
                if local.numel():
                    local.mul_(factor[start : start + length].reshape(local.shape))
