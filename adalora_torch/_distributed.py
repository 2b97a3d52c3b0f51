"""The rank allocator beyond one process: data parallel (DDP) and sharded (FSDP2) training.

Data parallel (DDP, ``torchrun``, ``transformers.Trainer`` / accelerate): gradients are
all-reduced before ``optimizer.step()`` and the allocator reads them after it, so every process
computes the same importance, scores and masks with no extra communication.
:func:`check_masks_agree` makes sure of it at each allocation (one ``all_gather`` of four
integers per process): DDP never re-synchronises parameters, so a divergence would otherwise go
unnoticed while the processes silently train different models.

Sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``): every process holds a slice of each
A, E and B and of its gradient. ``|p · g|`` and the EMAs are element-wise, so each process
keeps them for its own slice (``ShardedBucket``, which ``RankAllocator`` uses for ``DTensor``
parameters); only the triplet score needs a whole row of A and column of B.
:func:`sharded_triplet_scores` adds up each process's part of it in a vector of ``Σ r`` floats
and all-reduces that vector: weights are never gathered.

Several nodes change nothing here: the process group spans them (only the rendezvous
differs) and the collectives are the same.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors as unflatten

from ._ema import EmaState

__all__ = [
    "ShardedBucket",
    "check_masks_agree",
    "is_rank_zero",
    "is_sharded",
    "sharded_triplet_scores",
    "unwrap_model",
]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (else ``model``).

    ``RankAllocator`` builds on the unwrapped model, so its module names, ``rank_pattern`` and
    ``state_dict()`` are the same whether it was given the DDP-wrapped model (whose names gain a
    ``module.`` prefix) or the inner one, and the same as in a single-process run.

    >>> inner = nn.Linear(2, 2)
    >>> unwrap_model(nn.DataParallel(inner)) is inner
    True
    """
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def is_rank_zero(group: Any = None) -> bool:
    """True on the process of rank 0 of ``group`` (default: the world), and whenever
    ``torch.distributed`` is not initialised (a single process)."""
    return not _initialized() or torch.distributed.get_rank(group) == 0


def _collective_device(group: Any) -> torch.device:
    # NCCL needs CUDA tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU tensors
    backend = str(torch.distributed.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mask_checksum(keep: np.ndarray) -> int:
    """A 62-bit digest of a boolean mask (its length and bits), as a non-negative int."""
    data = keep.shape[0].to_bytes(8, "little") + np.packbits(keep).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def check_masks_agree(keep: np.ndarray, *, step: int, budget: int, group: Any = None) -> None:
    """Raise ``RuntimeError`` unless every process of ``group`` holds the same keep-mask.

    ``keep`` is the boolean keep-mask of all triplets (shape ``(Σ r,)``) that this process is
    about to apply at ``step`` with ``budget``. Each process contributes ``(step, budget,
    kept, checksum of keep)`` to one ``all_gather`` (four int64 per process), so every process
    sees the same table and all of them raise together (none is left waiting in a collective).
    Does nothing when ``torch.distributed`` is not initialised or the group has one process.

    A mismatch means the processes did not compute importance from the same gradients: the
    model was not wrapped in DDP/FSDP, ``update_and_allocate`` ran before ``optimizer.step()``
    (on gradients not yet reduced), a process skipped or repeated a step, or the allocator state
    was loaded on some processes only.
    """
    if not _initialized():
        return
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    row = [int(step), int(budget), int(keep.sum()), _mask_checksum(keep)]
    mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    if all(r == rows[0] for r in rows):
        return
    lines = "\n".join(
        f"  rank {k}: step {r[0]}, budget {r[1]}, kept {r[2]}, mask checksum {r[3]:#x}"
        for k, r in enumerate(rows)
    )
    raise RuntimeError(
        f"AdaLoRA rank allocation at step {step}: the keep-masks differ across processes "
        f"(this is rank {torch.distributed.get_rank(group)}):\n{lines}\n"
        "Every process must compute importance from the same all-reduced gradients. Check "
        "that the model is wrapped in DistributedDataParallel (or sharded with FSDP) on every "
        "process; that update_and_allocate(step) runs after optimizer.step() and before "
        "zero_grad(), on every process, with the same step (none skips or repeats one); that "
        "all processes use the same adapters, allocator settings and dtypes; and that an "
        "allocator state_dict was loaded on every process or on none."
    )


# -- sharded tensors ------------------------------------------------------------------------------
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


class ShardedBucket(EmaState):
    """``RankAllocator``'s state for adapter matrices whose A, E, B are ``DTensor`` (FSDP2).

    The same interface as the allocator's per-device ``_Bucket`` (``sensitivity()`` returns a
    tensor that is non-finite iff the step must be skipped, ``update`` takes it back), over this
    process's slices: the flat EMAs ``Ī``, ``Ū`` and the per-call workspace ``I`` hold the
    local slices (plus one slot, below),
    the triplet scores come from :func:`sharded_triplet_scores`' reduction (one all-reduce of
    ``Σ r`` floats per mesh dimension, at allocation steps only), and E is masked on its local
    rows. The spec skips a step's update when any ``p · g`` is non-finite: each step the local
    finiteness flag is min-reduced over the mesh (one float) and written into the last slot of
    the workspace (0, or NaN when another process saw a non-finite value), so that every process
    skips the same steps. The EMA views handed to ``state_dict`` are ``DTensor`` laid out like
    the parameters; loading takes those or whole tensors (each process keeps its slice).
    """

    def __init__(
        self,
        device: torch.device,
        members: list[int],
        triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        offsets: list[int],
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
        self.device = device
        self.members = members
        self.dparams = [t for tr in triplets for t in tr]  # member-major: A, E, B, A, E, B, ...
        self.params = self.dparams  # every A, E, B, as _Bucket.params (the allocator's checks)
        self.held = None  # never a workspace between calls (as _Bucket.held)
        self.param_member = [m for m in members for _ in range(3)]
        self.e_all = [tr[1] for tr in triplets]
        local = self._locals()
        self.numel = sum(t.numel() for t in local)
        ranks = [int(tr[1].shape[0]) for tr in triplets]
        self.score_pos = np.concatenate(
            [np.arange(offsets[m], offsets[m] + r) for m, r in zip(members, ranks)]
            + [np.zeros(0, dtype=np.int64)]
        )
        self.parts: list[_Part] = []
        pos = 0
        for tr, r in zip(triplets, ranks):
            for kind, p in enumerate(tr):
                self.parts.append(_part(p.shape, kind, pos, self.mesh, _layout(p, self.mesh)[2]))
            pos += r
        float64 = all(p.dtype == torch.float64 for p in self.dparams)
        self.dtype = torch.float64 if float64 else torch.float32
        kw: dict[str, Any] = {"device": device, "dtype": self.dtype}
        # local slices, then one slot for the peers' finiteness (0 or NaN)
        self.ema_s = torch.zeros(self.numel + 1, **kw) if with_ema else None  # Ī
        self.ema_u = torch.zeros(self.numel + 1, **kw) if with_ema else None  # Ū
        self.weights = (0.0, 0.0)
        self.weights_on = torch.zeros(2, **kw)
        self.mask_members: list[int] = []
        self.mask_pos = np.zeros(0, dtype=np.int64)
        self.e_masked: list[torch.Tensor] = []
        self.e_factors: list[torch.Tensor] = []

    def _locals(self) -> list[torch.Tensor]:
        return [_layout(p, self.mesh)[0] for p in self.dparams]

    def views(self, flat: torch.Tensor, member: int) -> tuple[torch.Tensor, ...]:
        """The A, E, B entries of ``member`` in a flat buffer, as ``DTensor`` laid out like the
        parameters (views of the local slices)."""
        dtensor, _, _ = _dtensor_types()
        k = self.members.index(member)
        params = self.dparams[3 * k : 3 * k + 3]
        local = unflatten(flat[: self.numel], self._locals())[3 * k : 3 * k + 3]
        out = []
        for p, t in zip(params, local):
            _, mesh, placements = _layout(p, self.mesh)
            out.append(dtensor.from_local(t, mesh, placements, shape=p.shape, stride=p.stride()))
        return tuple(out)

    def load_ema(self, member: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``(Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B)`` of ``member`` (``DTensor`` laid out like
        the parameters, or whole tensors) into the local slices of the flat EMAs."""
        assert self.ema_s is not None and self.ema_u is not None
        dtensor, _, _ = _dtensor_types()
        k = self.members.index(member)
        params = self.dparams[3 * k : 3 * k + 3] * 2
        dst = [
            unflatten(flat[: self.numel], self._locals())[3 * k + j]
            for flat in (self.ema_s, self.ema_u)
            for j in range(3)
        ]
        for d, src, p in zip(dst, cast(Sequence[Any], tensors), params):
            _, mesh, placements = _layout(p, self.mesh)
            if isinstance(src, dtensor):
                same = src.device_mesh == mesh and list(src.placements) == placements
                src = src.to_local() if same else src.full_tensor()
                if same:
                    d.copy_(src.reshape(d.shape))
                    continue
            d.copy_(_local_slice(src.reshape(p.shape), mesh, placements))

    def sensitivity(self) -> tuple[torch.Tensor, list[int]]:
        """``I = |p · g|`` of the local slices in the flat workspace, the peers' finiteness in
        its last slot, and the members without a gradient."""
        dtensor, _, _ = _dtensor_types()
        with torch.no_grad():
            params = self._locals()
            raw: list[Any] = [p.grad for p in self.dparams]
            missing = sorted({m for m, g in zip(self.param_member, raw) if g is None})
            grads = [
                torch.zeros_like(p) if g is None else g.to_local() if isinstance(g, dtensor) else g
                for p, g in zip(params, raw)
            ]
            # a workspace for this call only (freed with the caller's reference)
            work = torch.zeros(self.numel + 1, device=self.device, dtype=self.dtype)
            torch._foreach_addcmul_(list(unflatten(work[: self.numel], params)), params, grads)
            sens = work.abs_()
            ok = torch.isfinite(sens[: self.numel]).all().to(self.dtype).reshape(1)
            _all_reduce(ok, self.mesh, torch.distributed.ReduceOp.MIN)
            sens[self.numel :].copy_(torch.where(ok > 0, 0.0, float("nan")))
        return sens, missing

    def scores(self) -> torch.Tensor:
        """Triplet scores of the bucket's matrices (``score_pos`` order), the same on every
        process: local partial sums, all-reduced over the mesh."""
        assert self.ema_s is not None and self.ema_u is not None
        s = (self.ema_s * self.ema_u)[: self.numel]  # element scores Ī·Ū, local slices
        out = torch.zeros(len(self.score_pos), device=self.device, dtype=self.dtype)
        for local, part in zip(unflatten(s, self._locals()), self.parts):
            _add_part(out, local, part)
        _all_reduce(out, self.mesh)
        return out

    def apply_masks(self) -> None:
        """Multiply each E's local rows by their rows of the keep factors."""
        if not self.e_masked:
            return
        with torch.no_grad():
            for e, factor in zip(self.e_masked, self.e_factors):
                local, mesh, placements = _layout(e, self.mesh)
                start, length = _local_range(int(e.shape[0]), mesh, placements, 0)
                if local.numel():
                    local.mul_(factor[start : start + length].reshape(length, -1))
