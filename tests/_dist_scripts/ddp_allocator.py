"""Worker: ``RankAllocator`` on a tiny model wrapped in ``DistributedDataParallel``.

Launched by tests/torch/test_distributed.py with ``python -m torch.distributed.run
--nproc_per_node 2 ddp_allocator.py OUT [--wrap inner|ddp] [--accumulate N] [--diverge]``.
Each rank trains the full schedule on its half of every global batch and writes
``OUT/rank<k>.json`` (module names, budgets, the pattern of every allocation, the divergence
check's outcome) and ``OUT/rank<k>.safetensors`` (final A, E, B), plus the allocator state at
step 6 (``OUT/rank<k>_allocator.pt``). ``train(0, 1)`` is the single-process reference.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import (
    SCHEDULE,
    adapter_tensors,
    build_net,
    finish,
    global_batch,
    shard,
    write_json,
)
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from adalora_torch import RankAllocator, orthogonal_penalty

STATE_AT = 6  # the allocator state is saved after this step (budgeting phase, EMAs alive)


def _step(net, model, opt, step: int, rank: int, world: int, accumulate: int) -> None:
    for micro in range(accumulate):
        x, y = (shard(t, rank, world) for t in global_batch(step, micro))
        last = micro == accumulate - 1
        sync = contextlib.nullcontext() if last or world == 1 else net.no_sync()
        with sync:
            loss = torch.nn.functional.mse_loss(net(x), y) + 0.1 * orthogonal_penalty(model)
            (loss / accumulate).backward()
    opt.step()


def train(
    rank: int,
    world: int,
    *,
    wrap: str = "ddp",
    accumulate: int = 1,
    out: Path | None = None,
    poison: int | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Train the full schedule; returns (record, final adapter tensors, allocator state at
    ``STATE_AT``). ``wrap``: build the allocator on the DDP-wrapped model or the inner one.
    ``poison``: at that step, after ``optimizer.step()``, one gradient entry (``[0, 0]`` of
    ``layers.1.q``'s A) becomes inf, so the allocator must skip the step's update."""
    model = build_net()
    allocator = RankAllocator(model, **SCHEDULE) if wrap == "inner" else None
    net = DistributedDataParallel(model) if world > 1 else model
    if allocator is None:
        allocator = RankAllocator(net, **SCHEDULE)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    masks: dict[str, Any] = {}
    budgets = []
    state: dict[str, Any] = {}
    for step in range(SCHEDULE["total_step"]):
        _step(net, model, opt, step, rank, world, accumulate)
        if step == poison:
            grad = model.layers[1].q.lora_A["default"].grad
            grad[0, 0] = float("inf")
        budget, pattern = allocator.update_and_allocate(step)
        opt.zero_grad()
        budgets.append(budget)
        if pattern is not None:
            masks[str(step)] = pattern
        if step == STATE_AT:
            state = allocator.state_dict()
            if out is not None:
                torch.save(state, out / f"rank{rank}_allocator.pt")
    record = {
        "module_names": allocator.module_names,
        "masks": masks,
        "budgets": budgets,
        "skipped_steps": allocator.skipped_steps,
    }
    return record, adapter_tensors(model), state


def diverge(rank: int, world: int) -> dict[str, Any]:
    """Make the processes disagree on purpose and return what the check said: after step 3
    rank 1 loads a state whose importance favours the first module, rank 0 one that favours the
    others, so the allocation at step 4 keeps different triplets."""
    model = build_net()
    net = DistributedDataParallel(model) if world > 1 else model
    allocator = RankAllocator(net, **SCHEDULE)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for step in range(SCHEDULE["total_step"]):
        _step(net, model, opt, step, rank, world, 1)
        try:
            allocator.update_and_allocate(step)
        except RuntimeError as err:
            return {"step": step, "error": str(err)}
        opt.zero_grad()
        if step == 3:
            sd = allocator.state_dict()
            names = allocator.module_names
            for name in names[:1] if rank == 1 else names[1:]:
                for key in ("ema_sensitivity", "ema_uncertainty"):
                    for kind in ("lora_A", "lora_E", "lora_B"):
                        sd[key][f"{name}.{kind}"].fill_(1e3)
            allocator.load_state_dict(sd)
    return {"step": None, "error": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--wrap", choices=["ddp", "inner"], default="ddp")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--diverge", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record, tensors, _ = train(
        rank, world, wrap=args.wrap, accumulate=args.accumulate, out=args.out
    )
    if args.diverge:
        record["diverge"] = diverge(rank, world)
    save_file(tensors, str(args.out / f"rank{rank}.safetensors"))
    write_json(args.out / f"rank{rank}.json", record)
    finish()


if __name__ == "__main__":
    main()
