"""The rank allocator beyond one process: data parallel (DDP) helpers.

Data parallel (DDP, ``torchrun``, ``transformers.Trainer`` / accelerate): gradients are
all-reduced before ``optimizer.step()`` and the allocator reads them after it, so every process
computes the same importance, scores and masks with no extra communication.
:func:`check_masks_agree` makes sure of it at each allocation (one ``all_gather`` of four
integers per process): DDP never re-synchronises parameters, so a divergence would otherwise go
unnoticed while the processes silently train different models.

Sharded (FSDP2) training has its own module, ``adalora_torch._fsdp``.

Several nodes change nothing here: the process group spans them (only the rendezvous
differs) and the collectives are the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["check_masks_agree", "is_rank_zero", "unwrap_model"]


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
