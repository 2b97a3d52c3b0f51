"""AdaLoRA on 8-bit and 4-bit bases (bitsandbytes): peak memory and step time against
full-precision AdaLoRA and against PEFT's 8-bit / 4-bit AdaLoRA, and the error of merging into
quantized weights.

One process, one OPT-shaped causal LM (transformers' ``OPTForCausalLM``, random weights from a
seed, saved once to a temporary folder and loaded with ``from_pretrained(path,
quantization_config=...)`` as a user would), adapters on ``q_proj``/``v_proj``, one fixed batch
per seed. Configurations, each with its own model and AdamW:

- ours on the full-precision (float32) base: the reference of the "vs full precision" column;
- ours and PEFT's on the 8-bit base (``Linear8bitLt``), ours and PEFT's on the 4-bit NF4 base
  (``Linear4bit``, float32 compute): the "vs PEFT" column compares each of ours with PEFT's on
  the same base (goals: step time <= 1.05x, peak memory <= 1x).

A step is forward (loss + orthogonal penalty), backward, ``optimizer.step()``,
``update_and_allocate(step)`` (budgeting phase), ``zero_grad()``. Each round runs one step of
every configuration, in an order that rotates from round to round; ratios are per round, then
the median and quartiles over rounds and seeds (each seed: its own model weights and batch).

Peak memory: tensor bytes held (parameters, buffers, bitsandbytes' quantization statistics,
optimizer state; storage by storage) plus the largest amount one step allocates on top (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the allocation events of ``torch.profiler``, which
sees torch's own allocator: ``tracemalloc`` does not, and RSS deltas mix in the allocator's
caching and the interpreter).

Merge error (per base): after training, ``merge`` dequantizes, adds ``ΔW`` and requantizes.
Reported: the largest entry error ``|merged - (W + ΔW)|`` in units of half a grid step at that
entry (<= 1 means "rounded to the nearest grid point"), ``||merged - (W + ΔW)|| / ||ΔW||``, and
the largest change of the logits against the adapter model, beside the adapter's own effect.

    OMP_NUM_THREADS=1 python benchmarks/quantized.py            # hidden 256, 4 layers, 3 seeds
    python benchmarks/quantized.py --hidden 512 --layers 8 --rounds 20
    python benchmarks/quantized.py --device cuda                # --device auto: CUDA if present
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import clock, quantile, resolve_device, storage_bytes, timed, transient_peak_bytes
from torch import nn

TARGETS = ["q_proj", "v_proj"]
CONFIGS = ["ours fp32", "ours 8-bit", "PEFT 8-bit", "ours 4-bit", "PEFT 4-bit"]


@dataclass
class Run:
    name: str
    model: Any  # PEFT's or our PeftModel-like wrapper
    optimizer: torch.optim.Optimizer
    steps: int = 0
    times: list[float] = field(default_factory=list)


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def _save_model(args: argparse.Namespace, seed: int, path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        word_embed_proj_dim=args.hidden,
        num_hidden_layers=args.layers,
        ffn_dim=4 * args.hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(path)


def _load(path: Path, quant: str | None, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = None
    if quant == "8-bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "4-bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map={"": device}
    )
    return model


def _adalora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        init_r=args.rank,
        target_r=args.target_r,
        total_step=10_000,  # budgeting throughout the measured steps
        tinit=0,
        tfinal=0,
        deltaT=10,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def _build(name: str, path: Path, args: argparse.Namespace, device: torch.device) -> Run:
    quant = None if name.endswith("fp32") else name.split()[-1]
    base = _load(path, quant, device)
    model: Any
    if name.startswith("PEFT"):
        import peft

        model = peft.get_peft_model(base, peft.AdaLoraConfig(**_adalora_kwargs(args)))
    else:
        import adalora_hf

        model = adalora_hf.get_peft_model(base, adalora_hf.AdaLoraConfig(**_adalora_kwargs(args)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Run(name, model, torch.optim.AdamW(params, lr=1e-3))


def _step(run: Run, batch: dict[str, torch.Tensor]) -> None:
    run.model(**batch).loss.backward()
    run.optimizer.step()
    run.model.base_model.update_and_allocate(run.steps)
    run.optimizer.zero_grad(set_to_none=True)
    run.steps += 1


def _held_bytes(run: Run) -> int:
    tensors: list[torch.Tensor] = [*run.model.parameters(), *run.model.buffers()]
    for p in run.model.parameters():  # bitsandbytes keeps its statistics beside the weight
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    for module in run.model.modules():
        mstate = getattr(module, "state", None)  # Linear8bitLt's matmul state
        scb = getattr(mstate, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    for state in run.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    return storage_bytes(tensors)


def _merge_error(run: Run, batch: dict[str, torch.Tensor], device: torch.device) -> list[float]:
    """[max entry error / half grid step, ||error|| / ||ΔW||, logit change, adapter effect]"""
    from adalora_torch._bnb import dequantize_weight
    from adalora_torch._layers import iter_svd_layers

    model: Any = run.model
    model.eval()
    inputs = {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
        expected = {}
        layers: dict[str, Any] = dict(iter_svd_layers(model))
        for name, layer in layers.items():
            expected[name] = (
                dequantize_weight(layer.base_layer),
                layer.get_delta_weight("default"),
            )
        model.base_model.merge()
        merged_logits = model(**inputs).logits
        worst_units, err2, delta2 = 0.0, 0.0, 0.0
        for name, layer in layers.items():
            weight, delta = expected[name]
            merged = dequantize_weight(layer.base_layer)
            error = (merged - (weight + delta)).abs()
            if "8-bit" in run.name:  # rows: absmax / 127
                half = merged.abs().amax(dim=1, keepdim=True) / 254
            else:  # NF4 blocks of 64: absmax times half the widest gap of the code (0.139)
                half = merged.reshape(-1, 64).abs().amax(dim=1, keepdim=True).expand(-1, 64)
                half = (half * 0.1385).reshape(merged.shape)
            worst_units = max(worst_units, float((error / half).max()))
            err2 += float((error**2).sum())
            delta2 += float((delta**2).sum())
        model.base_model.unmerge()
    model.train()
    return [
        worst_units,
        (err2 / max(delta2, 1e-30)) ** 0.5,
        float((merged_logits - adapted).abs().max()),
        float((adapted - plain).abs().max()),
    ]


def _spread(values: list[float]) -> str:
    low, high = quantile(values, 0.25), quantile(values, 0.75)
    return f"{statistics.median(values):.3f} [{low:.3f}, {high:.3f}]"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=12, help="init_r")
    parser.add_argument("--target-r", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    _quiet()
    device = resolve_device(args.device)
    now = clock(args.clock, device)
    if args.hidden % 64:
        parser.error("--hidden must be a multiple of 64 (bitsandbytes' 4-bit blocks)")

    ratios: dict[str, dict[str, list[float]]] = {
        c: {"time_fp": [], "time_peft": [], "mem_fp": [], "mem_peft": []} for c in CONFIGS
    }
    step_ms: dict[str, list[float]] = {c: [] for c in CONFIGS}
    peak_mb: dict[str, list[float]] = {c: [] for c in CONFIGS}
    merge: dict[str, list[list[float]]] = {"ours 8-bit": [], "ours 4-bit": []}
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(device)
        batch = {"input_ids": ids, "labels": ids}
        with tempfile.TemporaryDirectory() as tmp:
            _save_model(args, seed, Path(tmp))
            runs = {name: _build(name, Path(tmp), args, device) for name in CONFIGS}
        peaks = {}
        for run in runs.values():
            for _ in range(args.warmup):
                _step(run, batch)
            transient = transient_peak_bytes(functools.partial(_step, run, batch), device)
            peaks[run.name] = _held_bytes(run) + transient
            peak_mb[run.name].append(peaks[run.name] / 2**20)
        for round_ in range(args.rounds):
            order = CONFIGS[round_ % len(CONFIGS) :] + CONFIGS[: round_ % len(CONFIGS)]
            for name in order:
                run = runs[name]
                run.times.append(timed(functools.partial(_step, run, batch), device, now))
        for name in CONFIGS:
            step_ms[name] += [1e3 * t for t in runs[name].times]
            peft_name = name.replace("ours", "PEFT")
            for k in range(args.rounds):
                t = runs[name].times[k]
                ratios[name]["time_fp"].append(t / runs["ours fp32"].times[k])
                if peft_name in runs:
                    ratios[name]["time_peft"].append(t / runs[peft_name].times[k])
            ratios[name]["mem_fp"].append(peaks[name] / peaks["ours fp32"])
            if peft_name in runs:
                ratios[name]["mem_peft"].append(peaks[name] / peaks[peft_name])
        for name in merge:
            merge[name].append(_merge_error(runs[name], batch, device))

    print(
        f"device {device}, clock {args.clock}; OPT hidden {args.hidden}, {args.layers} layers, "
        f"adapters on {TARGETS}, r {args.rank} -> {args.target_r}; batch {args.batch} x "
        f"{args.seq}; seeds {args.seeds}, {args.rounds} rounds each; median [quartiles]"
    )
    columns = [
        "step ms",
        "peak MiB",
        "time / fp32",
        "time / PEFT",
        "memory / fp32",
        "memory / PEFT",
    ]
    print("| configuration | " + " | ".join(columns) + " |")
    print("|" + " --- |" * 7)
    for name in CONFIGS:
        r = ratios[name]
        cells = [
            _spread(step_ms[name]),
            _spread(peak_mb[name]),
            _spread(r["time_fp"]),
            _spread(r["time_peft"]) if r["time_peft"] else "-",
            _spread(r["mem_fp"]),
            _spread(r["mem_peft"]) if r["mem_peft"] else "-",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    columns = ["max entry error / half step", "‖error‖ / ‖ΔW‖", "logit change", "adapter effect"]
    print("| merge into | " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in merge.items():
        cols = list(zip(*rows))
        print(f"| {name.split()[-1]} | " + " | ".join(_spread(list(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
