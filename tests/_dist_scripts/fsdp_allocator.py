"""Worker: ``RankAllocator`` on a tiny model sharded with FSDP2 (``fully_shard``), and the
hand-sharded score reduction.

Launched by tests/torch/test_distributed.py with ``python -m torch.distributed.run
--nproc_per_node 2 fsdp_allocator.py OUT --a-placement rows|in_features --build before|after
[--sync-free]`` (A sharded along its rank dimension, FSDP2's default, or along
``in_features``; the allocator built before or after ``fully_shard``; non-finite steps
skipped as on the CPU or as on an accelerator). At step 5 rank 0 alone sees an inf gradient
entry: both ranks must skip that update, as the single process does. Each rank writes
``OUT/rank<k>.json`` (module names, budgets, every allocation's pattern, the hand-sharded
scores and masks with their unsharded values, the checkpoint checks) and
``OUT/rank<k>.safetensors`` (final A, E, B gathered, for the comparison only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _common import (
    SCHEDULE,
    WithLoss,
    adapter_tensors,
    build_net,
    finish,
    global_batch,
    shard,
    write_json,
)
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from adalora_core import allocate, triplet_scores
from adalora_torch import RankAllocator, SVDAdapter
from adalora_torch._fsdp import is_sharded, sharded_triplet_scores


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    out = 0.0
    for key in ("ema_sensitivity", "ema_uncertainty"):
        for name, t in a[key].items():
            out = max(out, float((t.to_local() - b[key][name].to_local()).abs().max()))
    return out


POISON = 5  # after optimizer.step() of this step one gradient entry becomes inf (rank 0 only)


def train(out: Path, a_placement: str, build: str, sync_free: bool) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    net = build_net()
    a_params = {id(m.lora_A["default"]) for m in net.modules() if isinstance(m, SVDAdapter)}

    def placement(p: nn.Parameter) -> Shard | None:
        return Shard(1) if a_placement == "in_features" and id(p) in a_params else None

    model = WithLoss(net)
    # built before sharding, the allocator notices the new (DTensor) parameters at its first
    # call and moves its state into per-process slices
    early = RankAllocator(net, **SCHEDULE) if build == "before" else None
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    allocator = early or RankAllocator(net, **SCHEDULE)
    allocator._sync_free = sync_free  # True: the accelerator path (no host read of the flag)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks: dict[str, Any] = {}
    budgets = []
    sharded = True
    checks: dict[str, Any] = {}
    for step in range(SCHEDULE["total_step"]):
        x, y = (shard(t, rank, world) for t in global_batch(step))
        model(x, y).backward()
        opt.step()
        sharded = sharded and all(
            is_sharded(getattr(m, k)["default"])
            for m in net.modules()
            if isinstance(m, SVDAdapter)
            for k in ("lora_A", "lora_E", "lora_B")
        )
        if step == POISON and rank == 0:  # [0, 0] of A lives on rank 0 in both layouts
            with torch.no_grad():
                net.layers[1].q.lora_A["default"].grad.to_local()[0, 0] = float("inf")
        budget, pattern = allocator.update_and_allocate(step)
        opt.zero_grad()
        budgets.append(budget)
        if pattern is not None:
            masks[str(step)] = pattern
        if step == 6:
            checks = _checkpoint_checks(model, allocator, out, rank)
    tensors = adapter_tensors(net)  # gathers the weights, for the comparison only
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    return {
        "module_names": allocator.module_names,
        "masks": masks,
        "budgets": budgets,
        "sharded": sharded,
        "skipped_steps": allocator.skipped_steps,
        "hand_sharded": hand_sharded(mesh),
        **checks,
    }


def _checkpoint_checks(
    model: nn.Module, allocator: RankAllocator, out: Path, rank: int
) -> dict[str, Any]:
    """The allocator's state under FSDP: DTensor EMAs that load back into a new allocator, and
    whole (gathered) EMAs that load too (each process keeps its slice)."""
    state = allocator.state_dict()
    again = RankAllocator(model.net, **SCHEDULE)
    again.load_state_dict(state)
    roundtrip = _max_diff(again.state_dict(), state) == 0.0
    whole = dict(state)
    for key in ("ema_sensitivity", "ema_uncertainty"):
        whole[key] = {k: v.full_tensor() for k, v in state[key].items()}
    from_whole = RankAllocator(model.net, **SCHEDULE)
    from_whole.load_state_dict(whole)
    save_file(whole["ema_sensitivity"], str(out / f"rank{rank}_ema.safetensors"))
    return {
        "state_roundtrip": roundtrip,
        "state_from_whole": _max_diff(from_whole.state_dict(), state) == 0.0,
    }


def hand_sharded(mesh: Any) -> dict[str, Any]:
    """Element scores sharded by hand: A split along ``in_features``, B along
    ``out_features`` (uneven splits included), E replicated; every process passes its slices
    to ``sharded_triplet_scores`` and gets the unsharded scores."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same whole tensors in every process
    shapes = [(4, 8, 8), (4, 8, 3), (2, 5, 7)]
    whole, local = [], []
    for r, n_in, n_out in shapes:
        a = torch.rand(r, n_in, generator=g, dtype=torch.float64)
        e = torch.rand(r, 1, generator=g, dtype=torch.float64)
        b = torch.rand(n_out, r, generator=g, dtype=torch.float64)
        whole.append((a, e, b))

        def part(t: torch.Tensor, dim: int) -> DTensor:
            piece = t.chunk(world, dim)[rank].contiguous()
            return DTensor.from_local(piece, mesh, [Shard(dim)], shape=t.shape, stride=t.stride())

        rep = DTensor.from_local(e, mesh, [Replicate()], shape=e.shape, stride=e.stride())
        local.append((part(a, 1), rep, part(b, 0)))
    scores = sharded_triplet_scores(local).numpy()
    expected = np.concatenate(
        [triplet_scores(a.numpy(), e.numpy(), b.numpy()) for a, e, b in whole]
    )
    cuts = np.cumsum([s[0] for s in shapes])[:-1]
    budget = 5
    return {
        "scores": scores.tolist(),
        "expected_scores": expected.tolist(),
        "masks": [m.tolist() for m in allocate(np.split(scores, cuts), budget)],
        "expected_masks": [m.tolist() for m in allocate(np.split(expected, cuts), budget)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--a-placement", choices=["rows", "in_features"], default="rows")
    parser.add_argument("--build", choices=["before", "after"], default="after")
    parser.add_argument("--sync-free", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    record = train(args.out, args.a_placement, args.build, args.sync_free)
    write_json(args.out / f"rank{dist.get_rank()}.json", record)
    finish()


if __name__ == "__main__":
    main()
