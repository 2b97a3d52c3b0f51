"""Time per model-level ``update_and_allocate`` call: ``adalora_hf`` against PEFT.

Both sides are the call a training loop makes, ``model.base_model.update_and_allocate(step)``
on a model from ``get_peft_model`` (ours: ``adalora_hf``; PEFT's: ``peft``), on the same
BERT-shaped model (transformers' ``BertModel``, adapters on query/key/value/dense) with the same
adapter weights and the same gradients, in the budgeting phase (importance every step,
allocation every ``deltaT`` steps). Calls alternate, who goes first rotating step by step. The
run is repeated ``--repeats`` times; each repeat gives a median per call for both and their
ratio, and the summary is the median ratio with its min and max over the repeats. At the end
the masked E of both must be equal, so they did the same work. On the CPU the times are process
CPU time by default (``--clock``), which leaves out the time other processes hold the cores.

    OMP_NUM_THREADS=1 python benchmarks/allocator.py       # 24 layers, hidden 128, init_r 12
    python benchmarks/allocator.py --layers 12 --hidden 256 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from _common import TARGETS, add_model_args, bert_config, clock, resolve_device, timed
from torch import nn

import adalora_hf

GOAL = 5.0  # ours at least this many times faster than PEFT (median ratio over repeats)


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    model: nn.Module = BertModel(bert_config(args))
    return model


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p
        for n, p in model.named_parameters()
        if any(f".{k}." in n for k in ("lora_A", "lora_E", "lora_B"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--deltaT", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--grad-sets", type=int, default=4, help="gradient sets, cycled")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="auto (CUDA if present), cpu, cuda")
    parser.add_argument(
        "--clock", default="auto", choices=["auto", "cpu", "wall"], help="auto: cpu on the CPU"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    now = clock(args.clock, device)
    import peft

    n_steps = args.warmup + args.repeats * args.steps
    schedule = dict(
        init_r=args.rank,
        target_r=args.target_r,
        tinit=0,
        tfinal=0,
        total_step=100 * n_steps,  # stay in the budgeting phase
        deltaT=args.deltaT,
    )
    base = build_base(args)
    ours: Any = adalora_hf.get_peft_model(
        copy.deepcopy(base), adalora_hf.AdaLoraConfig(target_modules=TARGETS, **schedule)
    ).to(device)
    theirs: Any = peft.get_peft_model(
        base, peft.AdaLoraConfig(target_modules=TARGETS, **schedule)
    ).to(device)
    our_lora, their_lora = lora_params(ours), lora_params(theirs)
    assert our_lora.keys() == their_lora.keys()

    # a few gradient sets, cycled, shared by both (each only reads them): with one constant
    # gradient the uncertainty |I - Ī| decays into rounding noise and near-ties decide masks
    g = torch.Generator().manual_seed(0)
    grad_sets = [
        {n: torch.randn(p.shape, generator=g).to(device) for n, p in our_lora.items()}
        for _ in range(args.grad_sets)
    ]
    with torch.no_grad():
        for name, p in our_lora.items():
            if ".lora_E." in name:
                p.normal_(generator=g)  # E starts at 0: make the masking visible
            their_lora[name].copy_(p)

    calls = {
        "ours": ours.base_model.update_and_allocate,
        "peft": theirs.base_model.update_and_allocate,
    }
    order = list(calls)
    times: dict[str, list[list[float]]] = {k: [[] for _ in range(args.repeats)] for k in order}
    for step in range(n_steps):
        grads = grad_sets[step % len(grad_sets)]
        for name, p in our_lora.items():
            p.grad = their_lora[name].grad = grads[name]
        k = step % len(order)
        for who in order[k:] + order[:k]:  # rotate who goes first
            seconds = timed(lambda: calls[who](step), device, now)  # noqa: B023
            if step >= args.warmup:
                times[who][(step - args.warmup) // args.steps].append(seconds)
    same = all(torch.equal(p, their_lora[n]) for n, p in our_lora.items() if ".lora_E." in n)

    n_adapter = sum(p.numel() for p in our_lora.values())
    n_matrices = sum(1 for n in our_lora if ".lora_E." in n)
    print(
        f"BERT-shaped: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {n_matrices} adapted matrices, init_r {args.rank}, "
        f"{n_adapter:,} adapter parameters; device {device}"
        + (f", {args.threads} CPU thread(s)" if device.type == "cpu" else "")
        + f"; {'process CPU' if now is time.process_time else 'wall'} time; "
        f"{args.repeats} repeats of {args.steps} steps, allocation every {args.deltaT}; "
        f"model-level update_and_allocate (adalora_hf vs peft {peft.__version__})"
    )
    header = f"{'repeat':<8}{'ours ms':>10}{'peft ms':>10}{'peft / ours':>13}"
    print(header)
    print("-" * len(header))
    ratios = []
    for r in range(args.repeats):
        ours_ms = statistics.median(times["ours"][r]) * 1e3
        peft_ms = statistics.median(times["peft"][r]) * 1e3
        ratios.append(peft_ms / ours_ms)
        print(f"{r + 1:<8}{ours_ms:>10.3f}{peft_ms:>10.3f}{ratios[-1]:>12.1f}x")
    median = statistics.median(ratios)
    print(
        f"peft / ours: median {median:.1f}x, min {min(ratios):.1f}x, max {max(ratios):.1f}x "
        f"(median ms per call over all repeats: ours "
        f"{statistics.median(t for ts in times['ours'] for t in ts) * 1e3:.3f}, peft "
        f"{statistics.median(t for ts in times['peft'] for t in ts) * 1e3:.3f})"
    )
    print(f"masked E identical after the run: {same}")
    print(f"goal: ours >= {GOAL:g}x PEFT (median over repeats): {median:.1f}x", end=" ")
    print("met" if median >= GOAL and same else "MISSED")


if __name__ == "__main__":
    main()
