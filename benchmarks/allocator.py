"""Time per ``update_and_allocate`` call and allocator memory: ours against PEFT's.

Both allocators run in one process, on the same BERT-shaped model (transformers'
``BertModel``, adapters on query/key/value/dense), with the same adapter weights and the same
gradients, alternating call by call in the budgeting phase (allocation every ``deltaT`` steps).
At the end the masked E of both must be equal, so the two did the same work.

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
from torch import nn

from adalora_torch import inject_adapters
from adalora_torch._allocator import RankAllocator

TARGETS = ["query", "key", "value", "dense"]


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=1000,
    )
    torch.manual_seed(0)
    return BertModel(config)


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
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--rank", type=int, default=12, help="init_r")
    parser.add_argument("--target-r", type=int, default=4)
    parser.add_argument("--deltaT", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--grad-sets", type=int, default=4, help="gradient sets, cycled")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peft", action="store_true", help="time ours only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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

    def set_grads(step: int) -> None:
        grads = grad_sets[step % len(grad_sets)]
        for name, p in our_lora.items():
            p.grad = grads[name]
            if their_lora:
                their_lora[name].grad = grads[name]

    alloc = RankAllocator(ours, target_r=args.target_r, **schedule)

    timed: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in ("ours", "peft")}
    for step in range(1, args.warmup + args.steps + 1):
        set_grads(step)
        calls = [("ours", lambda s=step: alloc.update_and_allocate(s))]
        if theirs is not None:
            calls.append(("peft", lambda s=step: theirs.base_model.update_and_allocate(s)))
        if step % 2:
            calls.reverse()  # alternate who goes first
        for who, call in calls:
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            if step > args.warmup:
                timed[who][step % args.deltaT == 0].append(time.perf_counter() - t0)

    n_adapter = sum(p.numel() for p in our_lora.values())
    our_state = sum(
        t.numel()
        for k in ("ema_sensitivity", "ema_uncertainty")
        for t in alloc.state_dict()[k].values()
    )
    print(
        f"BERT-shaped: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {len(names)} adapted matrices, init_r {args.rank}, "
        f"{n_adapter:,} adapter parameters; device {device}, {args.threads} CPU thread(s); "
        f"{args.steps} timed steps, allocation every {args.deltaT}"
    )
    rows = [("all steps", None), ("allocation steps", True), ("other steps", False)]
    header = f"{'median ms / call':<20}{'ours':>10}{'peft':>10}{'peft / ours':>14}"
    print(header)
    print("-" * len(header))
    for label, kind in rows:
        vals = {
            who: median_ms(t[True] + t[False] if kind is None else t[kind])
            for who, t in timed.items()
        }
        ratio = vals["peft"] / vals["ours"] if theirs is not None else float("nan")
        print(f"{label:<20}{vals['ours']:>10.3f}{vals['peft']:>10.3f}{ratio:>13.1f}x")
    if theirs is not None:
        ra = theirs.base_model.rankallocator
        their_state = sum(
            t.numel() for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc) for t in d.values()
        )
        print(
            f"{'state floats/param':<20}{our_state / n_adapter:>10.2f}"
            f"{their_state / n_adapter:>10.2f}{their_state / our_state:>13.1f}x"
        )
        same = all(torch.equal(p, their_lora[n]) for n, p in our_lora.items() if ".lora_E." in n)
        print(f"masked E identical after the run: {same}")
    else:
        print(f"{'state floats/param':<20}{our_state / n_adapter:>10.2f}")


if __name__ == "__main__":
    main()
