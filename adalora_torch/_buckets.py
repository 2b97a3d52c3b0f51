"""The importance state of ``RankAllocator`` on one device: flat EMAs and triplet scores.

A ``Bucket`` holds the flat EMAs ``Ī`` (``ema_s``) and ``Ū`` (``ema_u``) of the adapter
matrices that live on one device, one float per entry of A, E and B. Matrices of equal
``(r, in, out)`` form a group and sit next to each other, ``A (G, r, in) | E (G, r, 1) |
B (G, out, r)``, so ``I = |p · g|`` is one ``torch.stack`` of ``p``, one of ``g`` and one
multiply per group and kind, and the triplet scores are one batched mean per group.

The bucket holds no parameters: the allocator reads A, E, B and their gradients from the
layers every step and hands them in (see ``RankAllocator``). Also here: the checks of a
layer's triplet and of the EMA tensors of a state dict, the layers' ``keep`` dicts, and
``fold_importance``, which folds a step's ``I`` into every bucket or, when any entry is
non-finite, into none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "Bucket",
    "EmaBuffers",
    "check_triplet",
    "fold_importance",
    "keep_dict",
    "saved_ema",
]

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A (r, in), E (r, 1), B (out, r)


def check_triplet(name: str, triplet: Triplet) -> int:
    """The rank ``r`` of a layer's ``(A, E, B)``; ``ValueError`` unless A is ``(r, in)``, E
    holds ``r`` entries, B is ``(out, r)`` and all three share a device."""
    a, e, b = triplet
    r = int(e.shape[0])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or e.numel() != r:
        raise ValueError(
            f"{name}: expected lora_A (r, in), lora_E (r, 1) and lora_B (out, r) with one r, "
            f"got {tuple(a.shape)}, {tuple(e.shape)} and {tuple(b.shape)}."
        )
    if not (a.device == e.device == b.device):
        raise ValueError(f"{name}: lora_A, lora_E and lora_B are on different devices.")
    return r


def saved_ema(
    sd: Mapping[str, Any], names: Sequence[str], triplets: Sequence[Triplet]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per module, ``(Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B)`` from a state dict's ``ema_sensitivity``
    and ``ema_uncertainty`` (``"<module>.lora_A|lora_E|lora_B"`` -> tensor); ``ValueError``
    when one is missing, misshapen, or holds NaN, infinite or negative entries (which an
    allocator never saves)."""
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, params in zip(names, triplets):
        tensors = []
        for key in ("ema_sensitivity", "ema_uncertainty"):
            if not isinstance(sd[key], Mapping):
                raise ValueError(f"{key} should map names to tensors, got {sd[key]!r}.")
            for kind, p in zip(("lora_A", "lora_E", "lora_B"), params):
                label = f"{key}[{name + '.' + kind!r}]"
                t = sd[key].get(f"{name}.{kind}")
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                    raise ValueError(
                        f"{label} should be a tensor of shape {tuple(p.shape)}, got {got}."
                    )
                local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: its slice
                if not bool((torch.isfinite(local) & (local >= 0)).all()):
                    raise ValueError(
                        f"{label} has NaN, infinite or negative entries, which an allocator never "
                        "saves: the state is corrupt; resume from another checkpoint."
                    )
                tensors.append(t)
        out[name] = tuple(tensors)
    return out


def keep_dict(layer: Any) -> dict[str, torch.Tensor]:
    """The layer's ``keep`` dict (adapter name -> boolean keep-mask), made if missing."""
    keep = getattr(layer, "keep", None)
    if not isinstance(keep, dict):
        keep = {}
        layer.keep = keep
    return keep


def ema_dtype(triplets: Sequence[Triplet]) -> torch.dtype:
    """float64 when every adapter parameter is float64, else float32."""
    float64 = all(t.dtype == torch.float64 for tr in triplets for t in tr)
    return torch.float64 if float64 else torch.float32


class EmaBuffers:
    """Flat ``Ī`` and ``Ū`` of ``numel`` entries on ``device`` and their update (shared by
    ``Bucket`` and the FSDP2 ``ShardedBucket``)."""

    def __init__(
        self,
        device: torch.device,
        numel: int,
        dtype: torch.dtype,
        weights: tuple[float, float],
        with_ema: bool,
    ) -> None:
        self.device, self.numel, self.dtype = device, numel, dtype
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.ema_s = torch.zeros(numel, **kw) if with_ema else None  # Ī
        self.ema_u = torch.zeros(numel, **kw) if with_ema else None  # Ū
        self.weights = weights  # (1-β1, 1-β2)
        self.weights_on = torch.tensor(weights, dtype=torch.float64).to(**kw)  # the same

    def update(self, work: torch.Tensor, finite: torch.Tensor | None) -> None:
        """Fold ``I`` (a workspace from ``sensitivity``, overwritten) into the EMAs.

        ``finite`` None: the caller checked that ``I`` is finite. A bool tensor on the device
        (accelerators, no host sync): where it is False the weights become 0 and the non-finite
        entries of ``I`` 0, so the EMAs stay as they are."""
        assert self.ema_s is not None and self.ema_u is not None
        w1: float | torch.Tensor
        w2: float | torch.Tensor
        if finite is None:
            w1, w2 = self.weights
        else:
            w1, w2 = (self.weights_on * finite.to(self.device)).unbind()
        with torch.no_grad():
            if finite is not None:
                work.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # 0 · (I - Ī) stays 0
            # lerp(x, y, w) = x + w·(y - x) = (1 - w)·x + w·y
            self.ema_s.lerp_(work, w1)  # Ī ← β1·Ī + (1-β1)·I
            work.sub_(self.ema_s).abs_()  # |I - Ī|, with the updated Ī
            self.ema_u.lerp_(work, w2)  # Ū ← β2·Ū + (1-β2)·|I - Ī|

    def to(self, device: torch.device) -> None:
        """Move the state to ``device``."""
        self.device = device
        self.weights_on = self.weights_on.to(device)
        if self.ema_s is not None and self.ema_u is not None:
            self.ema_s, self.ema_u = self.ema_s.to(device), self.ema_u.to(device)

    def drop_ema(self) -> None:
        """Free the EMAs (the final allocation)."""
        self.ema_s = self.ema_u = None


class _Group:
    """Members of equal ``(r, in, out)`` and E shape (``(r, 1)``, or ``(r,)`` in a
    third-party ``SVDAdapter``); their block in the flat buffers starts at ``offset``."""

    def __init__(self, ks: list[int], shape: tuple[int, ...], offset: int) -> None:
        self.ks, self.offset = ks, offset
        self.r, self.n_in, self.n_out, *e_shape = shape
        self.e_shape = tuple(e_shape)
        self.numel = len(ks) * self.r * (self.n_in + 1 + self.n_out)

    def blocks(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The A ``(G, r, in)``, E ``(G, *E.shape)`` and B ``(G, out, r)`` blocks of ``flat``."""
        g, r, n_in, n_out = len(self.ks), self.r, self.n_in, self.n_out
        block = flat[self.offset : self.offset + self.numel]
        a = block[: g * r * n_in].view(g, r, n_in)
        e = block[g * r * n_in : g * r * (n_in + 1)].view(g, *self.e_shape)
        b = block[g * r * (n_in + 1) :].view(g, n_out, r)
        return a, e, b


class Bucket(EmaBuffers):
    """The adapter matrices on one device (not sharded).

    ``members`` are indices into the allocator's module list (model order); methods taking
    ``triplets`` / ``grads`` take one entry per member, in that order. ``offsets[m]`` is the
    position of member ``m``'s first triplet among all triplets.
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
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, (a, e, b) in enumerate(triplets):
            by_shape.setdefault((a.shape[0], a.shape[1], b.shape[0], *e.shape), []).append(k)
        self.members = members
        self.groups: list[_Group] = []
        offset = 0
        for shape, ks in by_shape.items():
            self.groups.append(_Group(ks, shape, offset))
            offset += self.groups[-1].numel
        # global triplet positions of the entries of scores() (group order)
        self.score_pos = np.concatenate(
            [
                np.arange(offsets[members[k]], offsets[members[k]] + g.r)
                for g in self.groups
                for k in g.ks
            ]
            + [np.zeros(0, dtype=np.int64)]
        )
        super().__init__(device, offset, ema_dtype(triplets), weights, with_ema)

    def views(self, flat: torch.Tensor, k: int) -> Triplet:
        """The A, E, B views of the ``k``-th member in a flat buffer."""
        g = next(g for g in self.groups if k in g.ks)
        i = g.ks.index(k)
        a, e, b = g.blocks(flat)
        return a[i], e[i], b[i]

    def load_ema(self, k: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``(Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B)`` of the ``k``-th member into the EMAs."""
        assert self.ema_s is not None and self.ema_u is not None
        for dst, src in zip(self.views(self.ema_s, k) + self.views(self.ema_u, k), tensors):
            dst.copy_(src.reshape(dst.shape))

    def sensitivity(self, triplets: Sequence[Triplet], grads: Sequence[Any]) -> torch.Tensor:
        """``I = |p · g|`` of every entry, flat, in a new workspace of the EMA dtype; a None
        gradient counts as zero."""
        work = torch.empty(self.numel, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for g in self.groups:
                for kind, out in enumerate(g.blocks(work)):
                    ps = [triplets[k][kind] for k in g.ks]
                    gs = [grads[k][kind] for k in g.ks]
                    gs = [torch.zeros_like(p) if x is None else x for p, x in zip(ps, gs)]
                    torch.stack(ps, out=out)  # rounded to the EMA dtype, as the product is
                    out.mul_(torch.stack(gs))
            work.abs_()
        return work

    def scores(self) -> torch.Tensor:
        """Triplet scores ``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` with
        ``s = Ī·Ū`` (as ``adalora_core.triplet_scores``), in ``score_pos`` order."""
        assert self.ema_s is not None and self.ema_u is not None
        s = self.ema_s * self.ema_u
        parts = []
        for g in self.groups:
            a, e, b = g.blocks(s)
            e = e.reshape(len(g.ks), g.r)
            parts.append((e + (a.mean(dim=2) + b.mean(dim=1))).reshape(-1))
        return torch.cat(parts) if parts else s.new_zeros(0)

    def apply_masks(self, es: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
        """``E *= factor`` for each masked E (factors: 0/1 of shape (r, 1))."""
        if es:
            with torch.no_grad():
                torch._foreach_mul_(es, factors)


def fold_importance(
    buckets: Sequence[EmaBuffers], work: list[torch.Tensor], skipped: torch.Tensor, sync_free: bool
) -> int:
    """Fold each bucket's ``I`` (``work``, from ``sensitivity``) into its EMAs, or none of
    them when any entry of any ``I`` is non-finite (one flag for all matrices, as the core).

    ``sync_free`` False (the CPU, where reading it is free): the flag is read on the host;
    returns 1 for a skipped step, else 0. True (accelerators): the flag is never read; it
    selects the EMA weights on the device (``(0, 0)`` for a step to skip) and is added to the
    device counter ``skipped``; returns 0.
    """
    flags = [torch.isfinite(s.amax()).to(skipped.device) for s in work if s.numel()]
    finite = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    if not sync_free:
        if not bool(finite):
            return 1
        for bucket, sens in zip(buckets, work):
            bucket.update(sens, None)
        return 0
    skipped.add_(finite.to(skipped.device).logical_not())
    for bucket, sens in zip(buckets, work):
        bucket.update(sens, finite)
    return 0
