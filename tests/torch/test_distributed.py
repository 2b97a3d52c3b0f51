"""RankAllocator beyond one process: DDP (two gloo processes on the CPU), the cross-rank mask
check, DDP-wrapped vs inner models, and the sharded (FSDP2) score reduction.

Multi-process tests launch tests/_dist_scripts/* with ``python -m torch.distributed.run`` and
compare what the ranks wrote with each other and with one process trained on the same global
batches (the concatenation of the ranks' micro-batches), computed here in-process. The
expected values therefore come from the single-process allocator, itself checked against the
NumPy specification in tests/torch/test_allocator.py. One two-process DDP run is fast (a few
seconds) and runs by default; the others are ``slow`` (``nox -s slow``).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from adalora_core import allocate, triplet_scores
from adalora_torch import RankAllocator, inject_adapters
from adalora_torch._distributed import check_masks_agree, is_rank_zero, unwrap_model
from adalora_torch._fsdp import _local_range, sharded_triplet_scores

SCRIPTS = Path(__file__).resolve().parents[1] / "_dist_scripts"


@pytest.fixture(scope="module")
def workers() -> Iterator[ModuleType]:
    """The worker scripts' directory on ``sys.path``; yields their ``_common`` module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTS))
        yield importlib.import_module("_common")
        for name in ("_common", "ddp_allocator", "fsdp_allocator"):
            sys.modules.pop(name, None)


def _single(workers: ModuleType, **kwargs: Any) -> tuple[dict, dict, dict]:
    """One process, no process group, the whole global batch: the reference run."""
    ddp = importlib.import_module("ddp_allocator")
    return ddp.train(0, 1, **kwargs)


def _ranks(out: Path, n: int = 2) -> list[dict]:
    return [_read(out / f"rank{k}.json") for k in range(n)]


def _read(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def _assert_same_run(out: Path, reference: tuple[dict, dict, dict]) -> None:
    record, tensors, _ = reference
    ranks = _ranks(out)
    for k, got in enumerate(ranks):
        # exact: the same module names (no "module." prefix), budgets and every allocation
        assert got["module_names"] == record["module_names"], k
        assert got["budgets"] == record["budgets"], k
        assert got["masks"] == record["masks"], k
        weights = load_file(str(out / f"rank{k}.safetensors"))
        assert weights.keys() == tensors.keys()
        for key, value in tensors.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert sorted(record["masks"]) == ["4", "6", "8", "9"]  # three budgeting allocations, final
    final = record["masks"]["9"]
    assert sum(map(sum, final.values())) == 10  # exactly target_r * 5 matrices


# -- the fast two-process run -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(workers: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``torchrun``-style launch (2 processes, gloo): the full schedule on the DDP-wrapped
    model, then the divergence check; about 5 s."""
    out = tmp_path_factory.mktemp("ddp")
    workers.launch("ddp_allocator.py", str(out), "--diverge")
    return out


def test_ddp_masks_match_across_ranks_and_one_process(workers, ddp_run) -> None:
    ranks = _ranks(ddp_run)
    assert ranks[0]["masks"] == ranks[1]["masks"]
    _assert_same_run(ddp_run, _single(workers))


def test_ddp_allocator_state_loads_into_a_single_process_allocator(workers, ddp_run) -> None:
    """The state of an allocator built on the DDP-wrapped model has the inner model's names:
    it loads into an allocator over the plain model and equals the single-process state."""
    _, _, reference = _single(workers)
    state = torch.load(ddp_run / "rank0_allocator.pt", weights_only=True)
    assert state["module_names"] == reference["module_names"]
    assert state["rank_pattern"] == reference["rank_pattern"]
    for key in ("ema_sensitivity", "ema_uncertainty"):
        for name, value in reference[key].items():
            torch.testing.assert_close(state[key][name], value, rtol=1e-7, atol=1e-15)
    allocator = RankAllocator(workers.build_net(), **workers.SCHEDULE)
    allocator.load_state_dict(state)
    assert allocator.step == 6


def test_diverging_masks_raise_on_every_rank(ddp_run) -> None:
    for k, got in enumerate(_ranks(ddp_run)):
        outcome = got["diverge"]
        assert outcome["step"] == 4, outcome
        message = outcome["error"]
        assert "at step 4" in message and "differ across processes" in message
        assert "rank 0: step 4, budget 13" in message and "rank 1: step 4, budget 13" in message
        assert "DistributedDataParallel" in message and "optimizer.step()" in message
        assert f"this is rank {k}" in message


# -- slow multi-process runs ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("wrap", "accumulate"), [("inner", 1), ("ddp", 2)], ids=["inner-model", "ddp-no_sync-accum2"]
)
def test_ddp_variants_match_one_process(workers, tmp_path, wrap, accumulate) -> None:
    """The allocator built on the inner model before wrapping, and gradient accumulation with
    ``no_sync()`` on all but the last micro-batch: still the single-process run."""
    args = [str(tmp_path), "--wrap", wrap, "--accumulate", str(accumulate)]
    workers.launch("ddp_allocator.py", *args)
    _assert_same_run(tmp_path, _single(workers, wrap=wrap, accumulate=accumulate))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("a_placement", "build", "sync_free"),
    [("rows", "after", False), ("in_features", "before", True)],
    ids=["A-rows-built-after-cpu-path", "A-in_features-built-before-sync-free-path"],
)
def test_fsdp2_allocation_matches_one_process(
    workers, tmp_path, a_placement, build, sync_free
) -> None:
    """FSDP2 (``fully_shard``) on two gloo processes: every A, E, B is a DTensor; the allocator
    keeps EMAs of the local slices and all-reduces the partial triplet sums. A is sharded along
    its rank dimension (FSDP2's default ``Shard(0)``) or along ``in_features`` (``Shard(1)``);
    B along ``out_features``; the allocator is built after ``fully_shard`` or before it. At
    step 5 only rank 0 holds an inf gradient entry: both ranks skip the update, as one process
    does. The hand-sharded reduction is checked in the same run."""
    args = [str(tmp_path), "--a-placement", a_placement, "--build", build]
    workers.launch("fsdp_allocator.py", *args, *(["--sync-free"] if sync_free else []))
    record, tensors, state = _single(workers, poison=5)
    assert record["skipped_steps"] == 1
    ranks = _ranks(tmp_path)
    for k, got in enumerate(ranks):
        assert got["sharded"], "the adapter parameters should be DTensors under fully_shard"
        assert got["skipped_steps"] == 1, k
        assert got["module_names"] == record["module_names"]
        assert got["budgets"] == record["budgets"]
        assert got["masks"] == record["masks"], k
        weights = load_file(str(tmp_path / f"rank{k}.safetensors"))
        for key, value in tensors.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-9, atol=1e-12, msg=key)
        # hand-sharded element scores: the reduction gives the unsharded scores and masks
        hand = got["hand_sharded"]
        np.testing.assert_allclose(hand["scores"], hand["expected_scores"], rtol=1e-12)
        assert hand["masks"] == hand["expected_masks"]
        # allocator checkpoint under FSDP: DTensor EMAs round-trip; whole ones load too; the
        # sharded EMAs, gathered, are the single process's
        assert got["state_roundtrip"] and got["state_from_whole"]
        ema = load_file(str(tmp_path / f"rank{k}_ema.safetensors"))
        assert ema.keys() == state["ema_sensitivity"].keys()
        for name, value in state["ema_sensitivity"].items():
            torch.testing.assert_close(ema[name], value, rtol=1e-7, atol=1e-15, msg=name)


# -- in-process, no launcher ----------------------------------------------------------------------
@pytest.fixture
def world_of_one(tmp_path) -> Iterator[None]:
    """A gloo process group of one process (so DDP can wrap a model in this process)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    inject_adapters(model, ["0", "2"], rank=4)
    return model


def test_allocator_on_ddp_or_inner_model_has_interchangeable_state(world_of_one) -> None:
    model = _tiny()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    assert [n for n, _ in ddp.named_modules()][1] == "module"  # DDP adds a prefix ...
    kw = {"target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6}
    on_ddp, on_inner = RankAllocator(ddp, **kw), RankAllocator(model, **kw)
    assert on_ddp.module_names == on_inner.module_names == ["0", "2"]  # ... the allocator not
    x = torch.randn(5, 6)
    for step in range(3):
        ddp(x).square().sum().backward()
        on_ddp.update_and_allocate(step)
        model.zero_grad()
    on_inner.load_state_dict(on_ddp.state_dict())
    assert on_inner.step == 2 and on_inner.state_dict().keys() == on_ddp.state_dict().keys()
    assert is_rank_zero()


def test_check_masks_agree_is_silent_without_a_process_group() -> None:
    assert not dist.is_initialized()
    check_masks_agree(np.array([True, False]), step=3, budget=1)
    assert is_rank_zero()


def test_check_masks_agree_with_one_process_communicates_nothing(
    world_of_one, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of one process has nothing to compare: no collective runs, nothing is raised."""
    assert dist.get_world_size() == 1

    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_masks_agree ran a collective in a group of one process")

    monkeypatch.setattr(dist, "all_gather", no_collective)
    assert check_masks_agree(np.array([True, False]), step=3, budget=1) is None


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_local_range_splits_as_torch_chunk(size: int, n: int) -> None:
    """FSDP2 and DTensor's Shard(d) split a dimension as torch.chunk does (empty tail shards)."""
    from torch.distributed.tensor import Replicate, Shard

    class Mesh:  # the two methods _local_range reads, for process k of n on mesh dim 0
        def __init__(self, k: int) -> None:
            self.k = k

        def size(self, mesh_dim: int) -> int:
            return n

        def get_local_rank(self, mesh_dim: int) -> int:
            return self.k

    chunks = list(torch.arange(size).chunk(n))
    for k in range(n):
        start, length = _local_range(size, Mesh(k), [Shard(0)], 0)
        expected = chunks[k].tolist() if k < len(chunks) else []
        assert list(range(start, start + length)) == expected
        assert _local_range(size, Mesh(k), [Replicate()], 0) == (0, size)
        assert _local_range(size, Mesh(k), [Shard(1)], 0) == (0, size)


def test_sharded_triplet_scores_of_whole_tensors_is_the_core_formula() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6, 5), (2, 3, 7)]
    triplets = [
        (
            torch.rand(r, n_in, generator=g, dtype=torch.float64),
            torch.rand(r, 1, generator=g, dtype=torch.float64),
            torch.rand(n_out, r, generator=g, dtype=torch.float64),
        )
        for r, n_in, n_out in shapes
    ]
    got = sharded_triplet_scores(triplets).numpy()
    expected = np.concatenate(
        [triplet_scores(a.numpy(), e.numpy(), b.numpy()) for a, e, b in triplets]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    masks = allocate([got[:4], got[4:]], 3)
    assert sum(int(m.sum()) for m in masks) == 3


@pytest.mark.slow
def test_documented_torchrun_example_runs(workers, tmp_path) -> None:
    """docs/distributed.md's ``train_ddp.py``, run as documented (``torchrun --nproc_per_node
    2``): both ranks keep the same pattern, rank 0 writes the allocator state."""
    script = tmp_path / "train_ddp.py"
    script.write_text(workers.doc_script("train_ddp.py"))
    proc = workers.launch(script, cwd=tmp_path, allow_exit_abort=True)
    # the two processes share stdout: their lines may interleave
    kept = dict(re.findall(r"rank (\d): kept (\{[^}]*\})", proc.stdout))
    assert sorted(kept) == ["0", "1"] and kept["0"] == kept["1"], proc.stdout
    state = torch.load(tmp_path / "allocator.pt", weights_only=True)
    assert state["module_names"] == ["0", "2"] and state["finalized"]
    assert sum(map(sum, state["rank_pattern"].values())) == 8


def test_fsdp2_in_one_process_matches_the_plain_allocator(workers, world_of_one) -> None:
    """The sharded path (DTensor parameters, ShardedBucket) in one process, on a mesh of one:
    the same patterns, weights and skipped step as the plain allocator. The two-process runs
    are the slow tests above; this one keeps the sharded path in the fast suite."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adalora_torch._fsdp import is_sharded

    net = workers.build_net()
    model = workers.WithLoss(net)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    assert is_sharded(net.head.lora_A["default"])
    allocator = RankAllocator(net, **workers.SCHEDULE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks = {}
    for step in range(workers.SCHEDULE["total_step"]):
        model(*workers.global_batch(step)).backward()
        opt.step()
        if step == 5:
            with torch.no_grad():
                net.layers[1].q.lora_A["default"].grad.to_local()[0, 0] = float("inf")
        _, pattern = allocator.update_and_allocate(step)
        opt.zero_grad()
        if pattern is not None:
            masks[str(step)] = pattern
    record, tensors, _ = _single(workers, poison=5)
    assert masks == record["masks"]
    assert allocator.skipped_steps == record["skipped_steps"] == 1
    for key, value in workers.adapter_tensors(net).items():
        torch.testing.assert_close(value, tensors[key], rtol=1e-9, atol=1e-12, msg=key)
