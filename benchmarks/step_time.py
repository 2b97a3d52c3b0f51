"""Training-step time, inference time and peak memory: AdaLoRA here against PEFT's LoRA and AdaLoRA.

One process, one BERT-shaped model (transformers' ``BertForSequenceClassification``, random
weights, adapters on query/key/value/dense, the classifier trained too: ``task_type="SEQ_CLS"``
for every adapter), one fixed batch. Every configuration has its own
copy of the model and its own AdamW; each round runs one step of every configuration, in an
order that rotates from round to round, and the tables give medians over rounds and, for the
ratios, the median (and quartiles) of the per-round ratios, so slow drifts of a shared machine
cancel out. A training step is forward (loss + orthogonal penalty for AdaLoRA), backward,
``optimizer.step()``, ``update_and_allocate(step)`` for AdaLoRA, ``zero_grad()``.

Training configurations:

- PEFT LoRA at ``r = init_r``: the reference (ratio 1);
- PEFT AdaLoRA and ours, both in the budgeting phase (importance every step, allocation every
  ``deltaT`` steps);
- ours after the final allocation, the adapter shrunk to its surviving triplets with
  ``adalora_torch.shrink_to_pattern(model, optimizer)`` (``target_r · n`` triplets in all);
- PEFT LoRA at ``r = target_r`` (the same number of adapter parameters as the shrunk adapter).

Inference (``eval()``, ``torch.inference_mode()``, forward only): the bare base model, and each
adapter unmerged and merged into the weights (the adapter layers stay, as PEFT's
``merge_adapter``; ours also after ``merge_and_unload``, which leaves the plain model).

The allocator's share: ``update_and_allocate`` is also timed on its own inside each step of
"ours, budgeting", and its median share of the step is reported (goal: at most 1%).

Peak memory: tensor bytes held by the configuration (weights, optimizer state, allocator state,
counted storage by storage) plus the largest amount one step allocates on top (CUDA:
``torch.cuda.max_memory_allocated``; CPU: ``torch.profiler``'s allocation events).

    OMP_NUM_THREADS=1 python benchmarks/step_time.py   # 24 layers, hidden 128, r 12 -> 4, 16 x 64
    python benchmarks/step_time.py --layers 12 --hidden 256 --rounds 20
    python benchmarks/step_time.py --device cuda       # default --device auto: CUDA if present
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import (
    TARGETS,
    add_model_args,
    bert_config,
    clock,
    quantile,
    resolve_device,
    storage_bytes,
    tensors_in,
    timed,
    transient_peak_bytes,
)
from torch import nn

import adalora_hf
from adalora_torch import shrink_to_pattern

MiB = 2**20


@dataclass
class Config:
    """One model and how to run a step of it."""

    label: str
    model: nn.Module
    step: Callable[[], Any]
    state: Callable[[], list[torch.Tensor]]  # tensors held between steps
    times: list[float] = field(default_factory=list)
    peak: int = 0
    # seconds of update_and_allocate in the last step, and per timed step
    last_alloc: list[float] = field(default_factory=lambda: [0.0])
    alloc_times: list[float] = field(default_factory=list)


def build_base(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model: nn.Module = BertForSequenceClassification(bert_config(args, num_labels=2))
    return model.to(device)


def adapter_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def training(
    label: str,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    allocate: Callable[[int], Any] | None,
    allocator: Any = None,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> tuple[Config, torch.optim.Optimizer]:
    """A training configuration: AdamW over the trainable parameters; ``timer`` (if given)
    times ``allocate`` within the step."""
    optimizer = torch.optim.AdamW(adapter_params(model), lr=1e-3)
    counter = [0]
    model.train()
    spent = [0.0]

    def step() -> None:
        loss = model(**batch).loss  # AdaLoRA (PEFT's and ours): orthogonal penalty included
        loss.backward()
        optimizer.step()
        if allocate is not None:
            call = lambda: allocate(counter[0])  # noqa: E731
            spent[0] = timer(call) if timer is not None else 0.0
            if timer is None:
                call()
        optimizer.zero_grad(set_to_none=True)
        counter[0] += 1

    def state() -> list[torch.Tensor]:
        held = list(model.parameters()) + list(model.buffers())
        held += [g for p in model.parameters() if (g := p.grad) is not None]
        held += tensors_in(optimizer.state)
        return held + tensors_in(allocator, depth=4)

    return Config(label, model, step, state, last_alloc=spent), optimizer


def inference(label: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Config:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with torch.inference_mode():
            model(**inputs)

    def state() -> list[torch.Tensor]:
        return list(model.parameters()) + list(model.buffers())

    return Config(label, model, step, state)


def run_rounds(
    configs: list[Config], rounds: int, warmup: int, device: torch.device, now: Callable[[], float]
) -> None:
    """``warmup`` untimed rounds, then ``rounds`` timed ones; the order rotates each round."""
    for r in range(warmup + rounds):
        k = r % len(configs)
        for config in configs[k:] + configs[:k]:
            seconds = timed(config.step, device, now)
            if r >= warmup:
                config.times.append(seconds)
                config.alloc_times.append(config.last_alloc[0])


def measure_peaks(configs: list[Config], device: torch.device) -> None:
    for config in configs:
        transient = transient_peak_bytes(config.step, device)
        config.peak = storage_bytes(config.state()) + transient


def table(configs: list[Config], reference: Config, title: str, ref_name: str) -> list[str]:
    lines = [title]
    header = (
        f"{'configuration':<40}{'median ms':>10}{'x ' + ref_name:>16}{'[q25, q75]':>16}"
        f"{'peak MiB':>10}{'x peak':>8}"
    )
    lines += [header, "-" * len(header)]
    for c in configs:
        ratios = [t / r for t, r in zip(c.times, reference.times)]
        q = f"[{quantile(ratios, 0.25):.3f}, {quantile(ratios, 0.75):.3f}]"
        lines.append(
            f"{c.label:<40}{statistics.median(c.times) * 1e3:>10.1f}"
            f"{statistics.median(ratios):>16.3f}{q:>16}"
            f"{c.peak / MiB:>10.1f}{c.peak / reference.peak:>8.3f}"
        )
    return lines


def ratio(c: Config, reference: Config) -> float:
    return statistics.median(t / r for t, r in zip(c.times, reference.times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, rank_help="init_r, and LoRA's reference r")
    parser.add_argument("--alpha", type=float, default=8.0, help="lora_alpha of every adapter")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--deltaT", type=int, default=10, help="AdaLoRA: steps between allocations")
    parser.add_argument("--budget-steps", type=int, default=10, help="steps before the final one")
    parser.add_argument("--rounds", type=int, default=30, help="timed training rounds")
    parser.add_argument("--infer-rounds", type=int, default=30, help="timed inference rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    parser.add_argument(
        "--clock", default="auto", choices=["auto", "cpu", "wall"], help="auto: cpu on the CPU"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    now = clock(args.clock, device)
    import peft

    warnings.filterwarnings("ignore", category=FutureWarning)
    base = build_base(args, device)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, 1000, (args.batch, args.seq), generator=g).to(device),
        "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device),
    }
    total = 10**6  # the budgeting configurations never reach the final allocation
    schedule = dict(init_r=args.rank, target_r=args.target_r, tinit=0, deltaT=args.deltaT)

    # task_type SEQ_CLS everywhere: the classifier trains with the adapter, and PEFT's
    # AdaLoRA adds its orthogonal penalty (a PeftModel without a task type never calls the
    # tuner's forward, so the penalty is silently left out)
    task = "SEQ_CLS"

    def lora(r: int) -> nn.Module:
        cfg = peft.LoraConfig(target_modules=TARGETS, r=r, lora_alpha=args.alpha, task_type=task)
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    def ours(tfinal: int) -> Any:
        cfg = adalora_hf.AdaLoraConfig(
            target_modules=TARGETS,
            lora_alpha=args.alpha,
            tfinal=tfinal,
            total_step=total,
            task_type=task,
            **schedule,
        )
        return adalora_hf.get_peft_model(copy.deepcopy(base), cfg)

    their_cfg = peft.AdaLoraConfig(
        target_modules=TARGETS,
        lora_alpha=args.alpha,
        tfinal=0,
        total_step=total,
        task_type=task,
        **schedule,
    )
    their_ada: Any = peft.get_peft_model(copy.deepcopy(base), their_cfg)
    our_ada = ours(tfinal=0)
    # budget_steps steps of budgeting, the final allocation, then shrink
    final = args.budget_steps
    our_shrunk = ours(tfinal=total - final)
    shrunk, shrunk_opt = training(
        "ours, shrunk after the final allocation",
        our_shrunk,
        batch,
        our_shrunk.base_model.update_and_allocate,
        our_shrunk.base_model.rankallocator,
    )
    for _ in range(final + 1):
        shrunk.step()
    kept = shrink_to_pattern(our_shrunk, shrunk_opt)
    assert sum(kept.values()) == args.target_r * len(kept)

    reference, _ = training(f"PEFT LoRA r={args.rank}", lora(args.rank), batch, None)
    train = [
        reference,
        training(
            "PEFT AdaLoRA, budgeting",
            their_ada,
            batch,
            their_ada.base_model.update_and_allocate,
            their_ada.base_model.rankallocator,
        )[0],
        training(
            "ours, budgeting",
            our_ada,
            batch,
            our_ada.base_model.update_and_allocate,
            our_ada.base_model.rankallocator,
            timer=lambda fn: timed(fn, device, now),
        )[0],
        shrunk,
        training(f"PEFT LoRA r={args.target_r}", lora(args.target_r), batch, None)[0],
    ]
    n_matrices = len(kept)
    n_adapter = sum(p.numel() for n, p in our_ada.named_parameters() if ".lora_" in n)
    print(
        f"BERT-shaped: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {n_matrices} adapted matrices, init_r {args.rank} -> target_r "
        f"{args.target_r} ({n_adapter:,} AdaLoRA adapter parameters); batch {args.batch} x "
        f"{args.seq} tokens; device {device}"
        + (f", {args.threads} CPU thread(s)" if device.type == "cpu" else "")
        + f", {'process CPU' if now is time.process_time else 'wall'} time"
        + f"; allocation every {args.deltaT} steps; torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, peft {peft.__version__}"
    )
    run_rounds(train, args.rounds, args.warmup, device, now)
    measure_peaks(train, device)
    print()
    title = (
        f"Training step: forward, orthogonal penalty, backward, AdamW step, update_and_allocate; "
        f"{args.rounds} rounds"
    )
    print("\n".join(table(train, reference, title, f"LoRA r={args.rank}")))

    # the allocator's share of our budgeting step (timed inside the step)
    ours_train = train[2]
    shares = [a / t for a, t in zip(ours_train.alloc_times, ours_train.times)]
    share = 100 * statistics.median(shares)
    alloc_ms = statistics.median(ours_train.alloc_times) * 1e3
    print(
        f"update_and_allocate in 'ours, budgeting': median {alloc_ms:.2f} ms of a "
        f"{statistics.median(ours_train.times) * 1e3:.1f} ms step; its share of the step: "
        f"median {share:.2f}% [q25 {100 * quantile(shares, 0.25):.2f}%, q75 "
        f"{100 * quantile(shares, 0.75):.2f}%]"
    )

    # allocator memory between steps, floats per adapter parameter: everything it holds
    # (references to the parameters not counted)
    params = {p.untyped_storage().data_ptr() for p in our_ada.parameters()}
    held = tensors_in(our_ada.base_model.rankallocator, depth=4)
    own = [t for t in held if t.untyped_storage().data_ptr() not in params]
    ours_held = storage_bytes(own) / 4 / n_adapter
    sd = our_ada.base_model.rankallocator.state_dict()
    ours_state = sum(
        t.numel() for k in ("ema_sensitivity", "ema_uncertainty") for t in sd[k].values()
    )
    ours_state /= n_adapter
    ra = their_ada.base_model.rankallocator
    theirs_state = sum(
        t.numel() for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc) for t in d.values()
    )
    print(
        f"allocator state, floats per adapter parameter: ours {ours_state:.2f} (the EMAs), PEFT "
        f"{theirs_state / n_adapter:.2f} (ipt and its EMAs); held between steps (all it "
        f"references): ours {ours_held:.2f}, PEFT {theirs_state / n_adapter:.2f}"
    )

    # inference: the trained adapters, unmerged and merged (on copies)
    def merged(model: Any) -> Any:
        copy_ = copy.deepcopy(model)
        copy_.merge_adapter()
        return copy_

    bare = copy.deepcopy(base)
    infer = [
        inference("base model, no adapter", bare, batch),
        inference(f"PEFT LoRA r={args.rank}, unmerged", reference.model, batch),
        inference(f"PEFT LoRA r={args.rank}, merged", merged(reference.model), batch),
        inference("PEFT AdaLoRA, unmerged", their_ada, batch),
        inference("PEFT AdaLoRA, merged", merged(their_ada), batch),
        inference("ours, unmerged", our_ada, batch),
        inference("ours, merged", merged(our_ada), batch),
        inference("ours, merge_and_unload()", copy.deepcopy(our_ada).merge_and_unload(), batch),
        inference("ours, shrunk, unmerged", our_shrunk, batch),
    ]
    run_rounds(infer, args.infer_rounds, args.warmup, device, now)
    measure_peaks(infer, device)
    print()
    title = f"Inference: forward under torch.inference_mode(); {args.infer_rounds} rounds"
    print("\n".join(table(infer, infer[0], title, "base")))

    print()
    goals = [
        ("ours, budgeting <= 1.05 x PEFT LoRA r=init_r", ratio(train[2], reference), 1.05),
        ("ours, shrunk <= 1.00 x PEFT LoRA r=init_r", ratio(shrunk, reference), 1.00),
        (
            "ours, shrunk <= 1.05 x PEFT LoRA r=target_r",
            statistics.median(t / r for t, r in zip(shrunk.times, train[4].times)),
            1.05,
        ),
        ("allocator state (EMAs), floats / adapter param <= 2", ours_state, 2.0),
        ("update_and_allocate, % of ours' budgeting step <= 1", share, 1.0),
        ("ours merged inference <= 1.02 x base", ratio(infer[6], infer[0]), 1.02),
    ]
    for text, value, bound in goals:
        print(f"goal: {text:<52} {value:7.3f}  {'met' if value <= bound else 'MISSED'}")


if __name__ == "__main__":
    main()
