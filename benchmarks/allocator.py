"""Time per ``update_and_allocate`` call and allocator memory: ours against PEFT's.

Both allocators run in one process, on the same BERT-shaped model (transformers'
``BertModel``, adapters on query/key/value/dense), with the same adapter weights and the same
gradients, alternating call by call in the budgeting phase (allocation every ``deltaT`` steps).
Ours runs twice: with its CPU default (one workspace as large as an EMA) and with a chunked
workspace (its accelerator default, forced here). At the end the masked E of all must be
equal, so they did the same work. On the CPU the times are process CPU time by default
(``--clock``), which leaves out the time other processes hold the cores.

    python benchmarks/allocator.py                 # 24 layers, hidden 128, init_r 12
    python benchmarks/allocator.py --layers 12 --hidden 256 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from _common import TARGETS, add_model_args, bert_config
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
        "--chunk",
        type=int,
        default=None,
        help="entries per workspace chunk of the chunked run (default: the accelerator default "
        "for this adapter, max(2**16, entries / 16))",
    )
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

    alloc = RankAllocator(ours, target_r=args.target_r, **schedule)
    # the same allocator with a chunked workspace (the accelerator default; here forced)
    ours_chunked = copy.deepcopy(ours)
    chunked_lora = lora_params(ours_chunked)
    if args.chunk is None:
        args.chunk = max(1 << 16, -(-sum(p.numel() for p in our_lora.values()) // 16))
    allocator_module._CHUNK_FLOATS = args.chunk
    alloc_chunked = RankAllocator(ours_chunked, target_r=args.target_r, **schedule)
    allocator_module._CHUNK_FLOATS = None
    now = time.process_time if args.clock == "cpu" else time.perf_counter

    def set_grads(step: int) -> None:
        grads = grad_sets[step % len(grad_sets)]
        for name, p in our_lora.items():
            p.grad = chunked_lora[name].grad = grads[name]
            if their_lora:
                their_lora[name].grad = grads[name]

    who_all = ["ours", "chunked", "peft"]
    timed: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in who_all}
    for step in range(1, args.warmup + args.steps + 1):
        set_grads(step)
        calls = [
            ("ours", lambda s=step: alloc.update_and_allocate(s)),
            ("chunked", lambda s=step: alloc_chunked.update_and_allocate(s)),
        ]
        if theirs is not None:
            calls.append(("peft", lambda s=step: theirs.base_model.update_and_allocate(s)))
        k = step % len(calls)
        for who, call in calls[k:] + calls[:k]:  # rotate who goes first
            sync()
            t0 = now()
            call()
            sync()
            if step > args.warmup:
                timed[who][step % args.deltaT == 0].append(now() - t0)

    n_adapter = sum(p.numel() for p in our_lora.values())

    def floats(allocator: RankAllocator) -> tuple[float, float]:
        # per adapter parameter: the EMAs (the state), and everything held (+ the workspace)
        state = sum(
            t.numel()
            for k in ("ema_sensitivity", "ema_uncertainty")
            for t in allocator.state_dict()[k].values()
        )
        held = sum(
            t.numel()
            for b in allocator._buckets
            for t in (b.ema_s, b.ema_u, b.workspace)
            if t is not None
        )
        return state / n_adapter, held / n_adapter

    print(
        f"BERT-shaped: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {len(names)} adapted matrices, init_r {args.rank}, "
        f"{n_adapter:,} adapter parameters; device {device}, {args.threads} CPU thread(s), "
        f"{'process CPU' if args.clock == 'cpu' else 'wall'} time; {args.steps} timed steps, "
        f"allocation every {args.deltaT}; chunked: {args.chunk} floats per chunk"
    )
    rows = [("all steps", None), ("allocation steps", True), ("other steps", False)]
    header = (
        f"{'median ms / call':<22}{'ours':>9}{'chunked':>9}{'peft':>9}"
        f"{'peft / ours':>13}{'peft / chunked':>16}"
    )
    print(header)
    print("-" * len(header))
    for label, kind in rows:
        vals = {
            who: median_ms(t[True] + t[False] if kind is None else t[kind])
            for who, t in timed.items()
        }
        ratios = [vals["peft"] / vals[w] if theirs is not None else float("nan") for w in who_all]
        print(
            f"{label:<22}{vals['ours']:>9.3f}{vals['chunked']:>9.3f}{vals['peft']:>9.3f}"
            f"{ratios[0]:>12.1f}x{ratios[1]:>15.1f}x"
        )
    (state, held), (_, held_chunked) = floats(alloc), floats(alloc_chunked)
    if theirs is not None:
        ra = theirs.base_model.rankallocator
        their_state = (
            sum(t.numel() for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc) for t in d.values())
            / n_adapter
        )
        print(f"{'state floats/param':<22}{state:>9.2f}{state:>9.2f}{their_state:>9.2f}")
        print(f"{'held floats/param':<22}{held:>9.2f}{held_chunked:>9.2f}{their_state:>9.2f}")
        same = all(
            torch.equal(p, their_lora[n]) and torch.equal(p, chunked_lora[n])
            for n, p in our_lora.items()
            if ".lora_E." in n
        )
        print(f"masked E identical after the run (all three): {same}")
    else:
        print(f"{'state floats/param':<22}{state:>9.2f}{state:>9.2f}")
        print(f"{'held floats/param':<22}{held:>9.2f}{held_chunked:>9.2f}")


if __name__ == "__main__":
    main()
