"""Time per ``update_and_allocate`` call and allocator memory: ours against PEFT's.

Both allocators run in one process, on the same BERT-shaped model (transformers'
``BertModel``, adapters on query/key/value/dense), with the same adapter weights and the same
gradients, alternating call by call in the budgeting phase (allocation every ``deltaT`` steps).
At the end the masked E of both must be equal, so they did the same work. On the CPU the times
are process CPU time by default (``--clock``), which leaves out the time other processes hold
the cores.

Memory, in floats per adapter parameter: the state (ours: the EMAs a checkpoint holds; PEFT:
``ipt`` and its two EMAs, which its update keeps), what each allocator holds between calls
(every tensor it references that is not a model parameter), and the most a call allocates on
top (ours: the workspace for ``|p · g|``, freed at the end of the call, when the activations
of the step are already gone; CUDA: ``max_memory_allocated``, CPU: the profiler's allocation
events).

    python benchmarks/allocator.py                 # 24 layers, hidden 128, init_r 12
    python benchmarks/allocator.py --layers 12 --hidden 256 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    TARGETS,
    add_model_args,
    bert_config,
    storage_bytes,
    tensors_in,
    transient_peak_bytes,
)
from torch import nn

import adalora_torch._allocator as allocator_module
from adalora_torch import inject_adapters
from adalora_torch._allocator import RankAllocator


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(bert_config(args))


def lora_params(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        n.removeprefix(prefix): p
        for n, p in model.named_parameters()
        if any(f".{k}." in n for k in ("lora_A", "lora_E", "lora_B"))
    }


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3 if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--deltaT", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--grad-sets", type=int, default=4, help="gradient sets, cycled")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peft", action="store_true", help="time ours only")
    parser.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "cpu", "wall"],
        help="cpu: process CPU time (steadier on a shared machine); auto: cpu on the CPU",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    total_step = 100 * (args.steps + args.warmup)  # stay in the budgeting phase
    schedule = dict(tinit=0, tfinal=0, total_step=total_step, deltaT=args.deltaT)
    base = build_base(args)
    ours = copy.deepcopy(base)
    names = inject_adapters(ours, TARGETS, rank=args.rank, alpha=8.0)
    ours.to(device)
    our_lora = lora_params(ours)

    theirs: Any = None
    their_lora: dict[str, torch.Tensor] = {}
    if not args.no_peft:
        try:
            import peft
        except ImportError:
            print("peft is not installed: timing ours only")
        else:
            config = peft.AdaLoraConfig(
                target_modules=TARGETS, init_r=args.rank, target_r=args.target_r, **schedule
            )
            theirs = peft.get_peft_model(base, config).to(device)
            their_lora = lora_params(theirs, "base_model.model.")
            assert their_lora.keys() == our_lora.keys()

    # a few gradient sets, cycled, shared by both (each only reads them): with one constant
    # gradient the uncertainty |I - Ī| decays into rounding noise and near-ties decide masks
    g = torch.Generator(device="cpu").manual_seed(0)
    grad_sets = [
        {n: torch.randn(p.shape, generator=g).to(device) for n, p in our_lora.items()}
        for _ in range(args.grad_sets)
    ]
    with torch.no_grad():
        for name, p in our_lora.items():
            if ".lora_E." in name:
                p.normal_(generator=None)  # E starts at 0: make the masking visible
            if their_lora:
                their_lora[name].copy_(p)

    # ours twice: with this device's default workspace policy, and with the other one (CPU:
    # held between calls by default, per call forced; accelerators: the reverse)
    hold = device.type == "cpu"
    alloc = RankAllocator(ours, target_r=args.target_r, **schedule)
    ours_other = copy.deepcopy(ours)
    other_lora = lora_params(ours_other)
    allocator_module._HOLD_WORKSPACE = not hold
    alloc_other = RankAllocator(ours_other, target_r=args.target_r, **schedule)
    allocator_module._HOLD_WORKSPACE = None
    labels = {True: "held", False: "per call"}
    now = time.process_time if args.clock == "cpu" else time.perf_counter

    def set_grads(step: int) -> None:
        grads = grad_sets[step % len(grad_sets)]
        for name, p in our_lora.items():
            p.grad = other_lora[name].grad = grads[name]
            if their_lora:
                their_lora[name].grad = grads[name]

    calls: dict[str, Callable[[int], Any]] = {
        "ours": alloc.update_and_allocate,
        "other": alloc_other.update_and_allocate,
    }
    if theirs is not None:
        calls["peft"] = theirs.base_model.update_and_allocate
    order = list(calls)
    timed: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in order}
    for step in range(1, args.warmup + args.steps + 1):
        set_grads(step)
        k = step % len(order)
        for who in order[k:] + order[:k]:  # rotate who goes first
            sync()
            t0 = now()
            calls[who](step)
            sync()
            if step > args.warmup:
                timed[who][step % args.deltaT == 0].append(now() - t0)
    same = theirs is None or all(
        torch.equal(p, their_lora[n]) and torch.equal(p, other_lora[n])
        for n, p in our_lora.items()
        if ".lora_E." in n
    )

    n_adapter = sum(p.numel() for p in our_lora.values())
    print(
        f"BERT-shaped: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {len(names)} adapted matrices, init_r {args.rank}, "
        f"{n_adapter:,} adapter parameters; device {device}, {args.threads} CPU thread(s), "
        f"{'process CPU' if args.clock == 'cpu' else 'wall'} time; {args.steps} timed steps, "
        f"allocation every {args.deltaT}. ours: workspace {labels[hold]} (the {device.type} "
        f"default); other: workspace {labels[not hold]}"
    )
    header = (
        f"{'median ms / call':<22}{'ours':>9}{'other':>9}{'peft':>9}"
        f"{'peft / ours':>13}{'peft / other':>14}"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    for label, kind in [("all steps", None), ("allocation steps", True), ("other steps", False)]:
        v = {
            who: median_ms(t[True] + t[False] if kind is None else t[kind])
            for who, t in timed.items()
        }
        peft_ms = v.get("peft", float("nan"))
        ratios[label] = peft_ms / v["ours"]
        print(
            f"{label:<22}{v['ours']:>9.3f}{v['other']:>9.3f}{peft_ms:>9.3f}"
            f"{peft_ms / v['ours']:>12.1f}x{peft_ms / v['other']:>13.1f}x"
        )

    # memory, floats per adapter parameter: the state (ours: the EMAs; PEFT: ipt and its two
    # EMAs, which its update keeps), all that is held between calls, and the most that one
    # call allocates on top (measured: CUDA max_memory_allocated, CPU profiler events)
    step = args.warmup + args.steps

    def next_call(update: Callable[[int], Any]) -> Callable[[], Any]:
        def call() -> Any:
            nonlocal step
            step += 1
            set_grads(step)
            return update(step)

        return call

    def memory(allocator: Any, model: nn.Module, update: Callable[[int], Any]) -> list[float]:
        peak = transient_peak_bytes(next_call(update), device) / 4 / n_adapter
        return [held_floats(allocator, model), peak]

    state = sum(
        t.numel()
        for k in ("ema_sensitivity", "ema_uncertainty")
        for t in alloc.state_dict()[k].values()
    )
    cols = [
        [state / n_adapter, *memory(alloc, ours, alloc.update_and_allocate)],
        [state / n_adapter, *memory(alloc_other, ours_other, alloc_other.update_and_allocate)],
    ]
    if theirs is not None:
        ra = theirs.base_model.rankallocator
        dicts = (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc)
        their_state = sum(t.numel() for d in dicts for t in d.values()) / n_adapter
        cols.append([their_state, *memory(ra, theirs, theirs.base_model.update_and_allocate)])
    print(
        f"{'floats / adapter param':<22}{'ours':>9}{'other':>9}"
        + ("" if theirs is None else f"{'peft':>9}")
    )
    for i, label in enumerate(["state", "held between calls", "peak extra in a call"]):
        print(f"{label:<22}" + "".join(f"{c[i]:>9.2f}" for c in cols))
    if theirs is not None:
        print(f"masked E identical after the timed run (all three): {same}")
        print(
            f"goal: ours >= 10x PEFT (median, all steps): {ratios['all steps']:.1f}x "
            f"{'met' if ratios['all steps'] >= 10 else 'MISSED'}; state <= 2 floats / adapter "
            f"param: {cols[0][0]:.2f} {'met' if cols[0][0] <= 2 else 'MISSED'}"
        )


def held_floats(allocator: object, model: nn.Module) -> float:
    """Floats per adapter parameter in the tensors ``allocator`` holds that are not the
    model's parameters (views of one buffer count once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own = [
        t for t in tensors_in(allocator, depth=4) if t.untyped_storage().data_ptr() not in params
    ]
    n = sum(p.numel() for p in lora_params(model).values())
    return storage_bytes(own) / 4 / n


if __name__ == "__main__":
    main()
