"""AdaLoRA's settings on the ``lm`` task of ``benchmarks/quality.py``, one change at a time, and
LoRA trained on AdaLoRA's final rank pattern (what the allocation alone is worth).

Every run is the task's (byte-level GPT-2, English docs -> Python source, 300 AdamW steps of
16 x 64 bytes, linear decay, bits per byte on held-out source, ``benchmarks/_lm.py``); a run is
named by a spec, ``kind:key=value,...``:

* ``lora:r=4,lr=1e-2``: LoRA at rank ``r`` (scale 2) on c_attn, c_proj, c_fc;
* ``ada:lr=2e-2,tinit=.1,tfinal=.2,dT=10,b1=.85,b2=.85,scale=2,orth=0,init=12,target=4``:
  AdaLoRA (``tinit`` and ``tfinal`` as fractions of the steps, ``scale`` = ``lora_alpha /
  init_r``; the values shown are the defaults);
* ``pattern:ada_lr=2e-2,lr=1e-2``: AdaLoRA (defaults above, at ``ada_lr``), then LoRA at
  learning rate ``lr`` with, per matrix, the rank AdaLoRA kept there (fixed from the start).

    OMP_NUM_THREADS=1 python benchmarks/lm_grid.py --seeds 0 --specs lora:r=4,lr=1e-2 ada:lr=2e-2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # _lm: run as a script

STEPS = 300
BATCH = 16


def parse(spec: str) -> tuple[str, dict[str, float]]:
    """``kind:key=value,...`` -> (kind, {key: value}); ``ValueError`` for a malformed spec."""
    kind, _, rest = spec.partition(":")
    if kind not in ("lora", "ada", "pattern"):
        raise ValueError(f"spec {spec!r}: the kind must be lora, ada or pattern")
    values = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"spec {spec!r}: write key=value, got {item!r}")
        values[key] = float(value)
    return kind, values


def _adalora(model: Any, v: dict[str, float]) -> Any:
    from _lm import TARGETS

    import adalora_hf

    init = int(v.get("init", 12))
    config = adalora_hf.AdaLoraConfig(
        init_r=init,
        target_r=int(v.get("target", 4)),
        lora_alpha=v.get("scale", 2.0) * init,
        total_step=STEPS,
        tinit=int(STEPS * v.get("tinit", 0.1)),
        tfinal=int(STEPS * v.get("tfinal", 0.2)),
        deltaT=int(v.get("dT", 10)),
        beta1=v.get("b1", 0.85),
        beta2=v.get("b2", 0.85),
        orth_reg_weight=v.get("orth", 0.0),
        target_modules=TARGETS,
    )
    return adalora_hf.AdaLoraModel(model, config)


def run(base: Any, spec: str, seed: int) -> dict[str, Any]:
    """One spec on one seed: {spec, seed, bpb, params (final adapter parameters)}."""
    from _lm import (
        adalora_params,
        adapt,
        add_lora,
        bits_per_byte,
        frozen_copy,
        kept_ranks,
        python_source,
        target_paths,
    )

    kind, v = parse(spec)
    train, test = python_source()
    block = base.config.n_positions

    def frozen() -> Any:
        return frozen_copy(base, seed)

    def fit(model: Any, lr: float, after: Any) -> float:
        adapt(model, train, seed, STEPS, BATCH, block, lr, after)
        return bits_per_byte(model, test, block)

    out: dict[str, Any] = {"spec": spec, "seed": seed}
    if kind == "lora":
        model = frozen()
        ranks = dict.fromkeys(target_paths(model), int(v.get("r", 4)))
        out["params"] = add_lora(model, ranks, 2.0)
        out["bpb"] = fit(model, v.get("lr", 5e-3), None)
        return out
    ada = _adalora(frozen(), v if kind == "ada" else {})
    ada_bpb = fit(ada, v.get("lr" if kind == "ada" else "ada_lr", 5e-3), ada.update_and_allocate)
    if kind == "ada":
        out["params"] = adalora_params(ada.model)
        out["bpb"] = ada_bpb
        return out
    ranks = kept_ranks(ada.model)
    model = frozen()
    out["params"] = add_lora(model, ranks, 2.0)
    out["adalora_bpb"] = ada_bpb
    out["ranks"] = list(ranks.values())
    out["bpb"] = fit(model, v.get("lr", 5e-3), None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--specs", nargs="+", required=True, help="see the module docstring")
    parser.add_argument("--jsonl", type=Path, default=None, help="append every run here")
    args = parser.parse_args()
    for spec in args.specs:
        parse(spec)  # a typo fails now, not after an hour
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="AdaLoRA schedule")
    from _lm import LMRecipe, pretrained_lm

    from adalora_hf.cli._backbone import default_cache_dir

    base = pretrained_lm(LMRecipe(), default_cache_dir(), print)
    for seed in args.seeds:
        for spec in args.specs:
            start = time.perf_counter()
            row = run(base, spec, seed)
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
