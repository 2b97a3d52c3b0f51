"""LoftQ on a 4-bit base: how much of the loss the NF4 quantization costs the LoftQ start
recovers before any training, and AdaLoRA fine-tuned from it against AdaLoRA on the plainly
quantized base.

The model and task are ``benchmarks/quality.py``'s ``lm`` task (``benchmarks/_lm.py``): the
byte-level GPT-2 pretrained here on English documentation (cached), adapted to Python source,
scored in bits per byte on held-out source (lower is better). The 16 target matrices
(``c_attn``, ``c_proj``, ``c_fc``; transformers ``Conv1D``) are quantized to bitsandbytes NF4
``Linear4bit`` (blocks of 64); embeddings, layer norms and the output head stay in float32, as
bitsandbytes leaves them when loading a 4-bit model.

1. Before training: (a) the full-precision base, (b) the 4-bit base, (c) the 4-bit base with the
   LoftQ start (AdaLoRA ``init_r`` 12, ``init_lora_weights="loftq"``) for each ``--iters``
   value; recovered fraction ``((b) - (c)) / ((b) - (a))`` (goal >= 0.5).
2. Fine-tuning, per seed: AdaLoRA on the 4-bit base with the default start (E = 0) and with the
   LoftQ start (the last ``--iters`` value), ``quality.py``'s lm settings (init_r 12 ->
   target_r 4, lr 5e-3, 300 steps of 16 x 64 bytes, recommended schedule, ``--orth``);
   paired differences (LoftQ - default) as mean ± sd over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/loftq.py               # CPU, seeds 0 1 2
    python benchmarks/loftq.py --device cuda --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # _lm, _common: run as a script

from _common import resolve_device
from _lm import (
    TARGETS,
    LMRecipe,
    LMSettings,
    adapt,
    bits_per_byte,
    pretrained_lm,
    python_source,
)

BITS = 4


def quantized_base(base: nn.Module) -> nn.Module:
    """A frozen copy of ``base`` with every target quantized to NF4 (no adapter)."""
    from adalora_torch._loftq import quantize_linear

    model = copy.deepcopy(base)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in TARGETS:
                setattr(parent, name, quantize_linear(child, BITS))
    model.requires_grad_(False)
    return model


def adalora(base: nn.Module, s: LMSettings, orth: float, loftq_iter: int | None) -> Any:
    """AdaLoRA on the 4-bit base: LoftQ start from the full-precision ``base`` when
    ``loftq_iter`` is given, else the default start on ``quantized_base(base)``; with
    ``loftq_iter=0``, the default start on the full-precision base (the reference)."""
    from adalora_hf import AdaLoraConfig, AdaLoraModel, LoftQConfig

    if not loftq_iter:
        frozen = quantized_base(base) if loftq_iter is None else copy.deepcopy(base)
        frozen.requires_grad_(False)
        return AdaLoraModel(frozen, AdaLoraConfig(**s.adalora(orth)))
    config = AdaLoraConfig(
        **s.adalora(orth),
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=BITS, loftq_iter=loftq_iter),
    )
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    return AdaLoraModel(frozen, config)


def weight_error(base: nn.Module, model: nn.Module) -> float:
    """``||W - W_used||`` over the 16 target matrices (Frobenius, pooled), where ``W_used`` is
    what ``model`` computes with: the dequantized NF4 weight, plus ``s·B diag(E) A`` if any."""
    from adalora_torch._bnb import dequantize_weight
    from adalora_torch._layers import is_conv1d

    wrapped = dict(model.named_modules())
    total = 0.0
    for name, module in base.named_modules():
        if name.rpartition(".")[2] not in TARGETS:
            continue
        w = module.weight.detach().float()
        w = w.T if is_conv1d(module) else w  # (out, in)
        used = wrapped.get(name) or wrapped[f"model.{name}"]
        if hasattr(used, "base_layer"):  # an adapter layer
            dense = dequantize_weight(used.base_layer) + used.get_delta_weight("default").detach()
        else:
            dense = dequantize_weight(used)
        total += float((w - dense).pow(2).sum())
    return total**0.5


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", nargs="+", type=int, default=[1, 2, 5, 10], help="part 1")
    parser.add_argument("--train-iter", type=int, default=5, help="loftq_iter of part 2")
    parser.add_argument("--orth", type=float, default=0.5, help="orth_reg_weight")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--no-train", action="store_true", help="only the start (part 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from adalora_hf.cli._backbone import default_cache_dir

    device = resolve_device(args.device)
    start = time.perf_counter()
    base = pretrained_lm(LMRecipe(), default_cache_dir(), print).to(device).eval()
    s = LMSettings(steps=args.steps)
    train, test = python_source()
    block = base.config.n_positions

    fp = bits_per_byte(base, test, block)
    plain = quantized_base(base)
    q4, plain_error = bits_per_byte(plain, test, block), weight_error(base, plain)
    print(f"\ndevice {device}; {len(test):,} held-out bytes of Python source")
    print(f"{'':<38}{'bits/byte':>10}{'recovered':>11}{'weight error':>14}")
    print(f"{'(a) full-precision base':<38}{fp:>10.4f}")
    print(f"{'(b) NF4 base (16 target matrices)':<38}{q4:>10.4f}{0.0:>11.3f}{1.0:>14.3f}")
    for it in args.iters:
        torch.manual_seed(0)
        model = adalora(base, s, args.orth, it)
        lq, err = bits_per_byte(model, test, block), weight_error(base, model) / plain_error
        label = f"(c) NF4 + LoftQ start, loftq_iter={it}"
        print(f"{label:<38}{lq:>10.4f}{(q4 - lq) / (q4 - fp):>11.3f}{err:>14.3f}")
    print("recovered: ((b) - (c)) / ((b) - (a)); weight error: ||W - W_used|| relative to (b)")
    if args.no_train:
        return

    methods = {"fp": 0, "default": None, "loftq": args.train_iter}
    results: dict[str, list[float]] = {name: [] for name in methods}
    for seed in args.seeds:
        for name, it in methods.items():
            torch.manual_seed(seed)
            model = adalora(base, s, args.orth, it)
            adapt(model, train, seed, s.steps, s.batch_size, block, s.lr, model.update_and_allocate)
            results[name].append(bits_per_byte(model, test, block))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(
        f"\nAdaLoRA init_r {s.init_r} -> target_r {s.target_r}, {s.steps} steps, "
        f"orth_reg_weight {args.orth}, seeds {args.seeds}: bits/byte after training"
    )
    labels = {
        "fp": "full-precision base (reference)",
        "default": "NF4 base, default start (E = 0)",
        "loftq": f"NF4 base, LoftQ start (T={args.train_iter})",
    }
    for name, label in labels.items():
        vals = results[name]
        per_seed = " ".join(f"{v:.4f}" for v in vals)
        print(f"{label:<40}{mean_sd(vals)[1:]:>18}   per seed {per_seed}")
    diffs = [b - a for a, b in zip(results["default"], results["loftq"])]
    print(f"{'LoftQ - default start (paired)':<40}{mean_sd(diffs):>18}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
