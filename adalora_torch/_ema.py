"""The importance state every bucket of ``RankAllocator`` keeps, and its update.

Shared by the allocator's per-device ``_Bucket`` and the FSDP2 ``ShardedBucket``: both hold
flat EMAs ``Ī`` (``ema_s``) and ``Ū`` (``ema_u``), the EMA weights ``(1-β1, 1-β2)`` as floats
and on the device, and the keep factors of E, and fold ``I = |p · g|`` into the EMAs the same
way.
"""

from __future__ import annotations

import torch

__all__ = ["EmaState"]


class EmaState:
    """Flat importance EMAs on one device (set up by the subclass's ``__init__``)."""

    device: torch.device
    ema_s: torch.Tensor | None  # Ī, flat (None once the final allocation dropped it)
    ema_u: torch.Tensor | None  # Ū, flat
    weights: tuple[float, float]  # (1-β1, 1-β2)
    weights_on: torch.Tensor  # the same, on the device
    e_factors: list[torch.Tensor]  # keep-masks of E as 0/1 factors, shape (r, 1)

    def update(self, work: torch.Tensor, finite: torch.Tensor | None) -> None:
        """Fold ``I`` (``sensitivity()``'s workspace, overwritten) into the EMAs. ``finite``
        None: the caller checked that ``I`` is finite; a bool tensor: keep the EMAs as they are
        where it is False, without reading it on the host (accelerators)."""
        assert self.ema_s is not None and self.ema_u is not None
        w1: float | torch.Tensor
        w2: float | torch.Tensor
        if finite is None:
            w1, w2 = self.weights
        else:  # weights 0 for a non-finite step: the lerps below leave the EMAs as they are
            w1, w2 = (self.weights_on * finite).unbind()
        with torch.no_grad():
            if finite is not None:
                work.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # 0 · (I - Ī) stays 0
            # one pass per EMA: lerp(x, y, w) = x + w·(y - x) = (1 - w)·x + w·y
            self.ema_s.lerp_(work, w1)  # Ī ← β1·Ī + (1-β1)·I
            work.sub_(self.ema_s).abs_()  # |I - Ī|, with the updated Ī
            self.ema_u.lerp_(work, w2)  # Ū ← β2·Ū + (1-β2)·|I - Ī|

    def to(self, device: torch.device) -> None:
        """Move the state to ``device``."""
        self.device = device
        for name in ("ema_s", "ema_u", "weights_on"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self.e_factors = [f.to(device) for f in self.e_factors]
