"""Helpers shared by the benchmark scripts: the model shape, device choice, timing,
tensor-memory accounting."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

# the model: 24-layer BERT-shaped, hidden 128, adapters on query/key/value/dense
TARGETS = ["query", "key", "value", "dense"]


def add_model_args(parser: argparse.ArgumentParser, rank_help: str = "init_r") -> None:
    """The BERT shape and the AdaLoRA ranks, the same defaults in every benchmark."""
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--rank", type=int, default=12, help=rank_help)
    parser.add_argument("--target-r", type=int, default=4)


def bert_config(args: argparse.Namespace, **extra: Any) -> Any:
    """A ``transformers.BertConfig`` of the shape given by :func:`add_model_args`."""
    from transformers import BertConfig

    return BertConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=1000,
        **extra,
    )


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(name: str, device: torch.device) -> Callable[[], float]:
    """``wall`` (``time.perf_counter``) or ``cpu`` (this process's CPU time, which leaves out
    the time other processes hold the cores: steadier on a shared machine); ``auto``: CPU time
    on the CPU, wall time on an accelerator (whose work the process's CPU time does not see)."""
    if name == "auto":
        name = "cpu" if device.type == "cpu" else "wall"
    return time.process_time if name == "cpu" else time.perf_counter


def timed(fn: Callable[[], Any], device: torch.device, now: Callable[[], float]) -> float:
    """Seconds that ``fn()`` takes on the clock ``now``, queued device work included."""
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def tensors_in(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    """Tensors held by ``obj``'s attributes, lists, tuples and dicts, ``depth`` levels deep."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in tensors_in(item, depth - 1)]


def transient_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Largest amount of tensor memory that ``fn()`` holds above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call. CPU: the allocation and free
    events of ``torch.profiler`` (``profile_memory=True``), summed in time order. ``fn`` runs
    more than once (CPU: three times, the last one measured).
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile, record_function

    # two calls, the second one measured: blocks that the first allocates and the second frees
    # are known to the profiler (frees of older blocks are not reported)
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("measured"):
            fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    span = next((e.start_ns(), e.end_ns()) for e in events if e.name() == "measured")
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = start = peak = 0
    for t, nbytes in memory:
        if t < span[0]:
            start = live = live + nbytes
        elif t <= span[1]:
            live += nbytes
            peak = max(peak, live - start)
    return peak
