"""The ``adalora`` command line: its argument parser, the ``demo`` and ``inspect`` commands and
``main``, which runs them and returns the exit code."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._serialization import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adalora",
        description="AdaLoRA: adaptive rank allocation for low-rank fine-tuning.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="AdaLoRA vs LoRA vs head-only on a tiny ViT over sklearn's digits (offline)",
        description="Pretrain a tiny ViT on digits 0-4 (cached), adapt it to digits 5-9 with "
        "AdaLoRA (init_r 8 -> target_r 1), plain LoRA at the same final parameter count "
        "(rank 1), plain LoRA at AdaLoRA's initial rank (8, the ceiling), and the head alone; "
        "print a table (test cross-entropy and accuracy) and AdaLoRA's paired difference to "
        "LoRA, save the AdaLoRA adapter in PEFT's format and two plots.",
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=300, help="optimizer steps per method (default: 300)"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, initialisation and batch order (default: 0)",
    )
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="run seeds --seed .. --seed + N - 1 and print AdaLoRA's paired differences to "
        "LoRA over them; the first seed writes to --out, the others to --out/seed-S (default 1)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("adalora-demo"),
        help="output directory (default: ./adalora-demo)",
    )
    demo.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="where to train (default: auto = cuda when available)",
    )
    demo.add_argument("--init-r", type=_positive_int, default=8, help="AdaLoRA init_r (default 8)")
    demo.add_argument(
        "--target-r",
        type=_positive_int,
        default=1,
        help="AdaLoRA target_r and LoRA's rank at equal final parameters (default 1)",
    )
    demo.add_argument(
        "--tinit-frac",
        type=float,
        default=0.1,
        help="warm-up steps, as a fraction of --steps (default 0.1)",
    )
    demo.add_argument(
        "--tfinal-frac",
        type=float,
        default=0.2,
        help="final steps, as a fraction of --steps (default 0.2)",
    )
    demo.add_argument(
        "--deltaT", type=_positive_int, default=10, help="steps between allocations (default 10)"
    )
    demo.add_argument(
        "--orth-reg-weight",
        type=float,
        default=0.5,
        help="weight of the orthogonality penalty (default 0.5)",
    )
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    demo.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the pretrained backbone is cached (default: "
        "$ADALORA_CACHE_DIR or ~/.cache/adalora)",
    )
    # tests: a smaller backbone with a short pretraining
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    inspect = commands.add_parser(
        "inspect",
        help="ranks, totals and a heatmap of a saved AdaLoRA adapter (ours or PEFT's)",
        description=f"Read {CONFIG_NAME} and {WEIGHTS_NAME} from PATH and "
        "print the rank of every adapted matrix, the totals and the parameter count.",
    )
    inspect.add_argument("path", type=Path, metavar="PATH", help="adapter directory")
    inspect.add_argument(
        "--out", type=Path, default=None, help="heatmap PNG to write (default: PATH/ranks.png)"
    )
    return parser


def _demo_command(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ._backbone import TINY_RECIPE, Recipe
    from ._demo import paired_differences, resolve_device, run_demo
    from ._runs import DemoSettings

    hf_logging.disable_progress_bar()  # "Loading weights" bars for a 60k-parameter model

    def fail(message: str) -> int:
        print(f"adalora demo: {message}", file=sys.stderr)
        return 2

    if not (
        0 <= args.tinit_frac < 1
        and 0 <= args.tfinal_frac < 1
        and args.tinit_frac + args.tfinal_frac < 1
    ):
        return fail(
            "--tinit-frac and --tfinal-frac are fractions of --steps in [0, 1) whose sum is "
            "below 1."
        )
    settings = DemoSettings(
        steps=args.steps,
        lr=args.lr,
        init_r=args.init_r,
        target_r=args.target_r,
        tinit_frac=args.tinit_frac,
        tfinal_frac=args.tfinal_frac,
        deltaT=args.deltaT,
        orth_reg_weight=args.orth_reg_weight,
    )
    try:  # fail before pretraining: a device that is not there, settings AdaLoRA refuses
        resolve_device(args.device)
        settings.adalora_config()
    except ValueError as err:
        return fail(str(err))
    start = time.perf_counter()
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        results.append(
            run_demo(
                settings=settings,
                seed=seed,
                out=args.out if seed == args.seed else args.out / f"seed-{seed}",
                device=args.device,
                recipe=TINY_RECIPE if args.tiny else Recipe(),
                cache_dir=args.cache_dir,
            )
        )
        print()
        print(f"seed {seed}:" if args.seeds > 1 else "", results[-1].table(), sep="\n")
    print()
    print("\n".join(paired_differences(results)))
    print()
    result = results[0]
    a = result.adapter
    print(
        f"AdaLoRA kept {a.total_rank} of {settings.init_r * len(a.modules)} triplets "
        f"({a.total_rank / len(a.modules):.2f} per matrix on average); "
        "adapter params = kept rank x (in + out + 1)."
    )
    print(f"adapter (PEFT format): {result.out / 'adalora-adapter'}")
    print(f"rank heatmap:          {result.out / 'ranks.png'}")
    print(f"budget and loss:       {result.out / 'budget_loss.png'}")
    print(f"numbers:               {result.out / 'results.json'}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


def _inspect_command(args: argparse.Namespace) -> int:
    from ._inspect import AdapterError, format_adapter_table, read_adapter
    from ._plots import plot_rank_heatmap

    try:
        summary = read_adapter(args.path)
    except AdapterError as err:
        print(f"adalora inspect: {err}", file=sys.stderr)
        return 2
    print(format_adapter_table(summary))
    out = args.out if args.out is not None else args.path / "ranks.png"
    if out.is_dir():
        out = out / "ranks.png"
    elif out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")  # what matplotlib would write; say it
    init_r = summary.config.get("init_r")
    try:
        plot_rank_heatmap(
            {m.name: m.rank for m in summary.modules},
            out,
            init_r=init_r if isinstance(init_r, int) else None,
            title=f"{args.path.name}: rank per layer and module ({summary.total_rank} triplets)",
        )
    except OSError as err:
        print(f"adalora inspect: cannot write {out}: {err}", file=sys.stderr)
        return 2
    print(f"heatmap: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adalora`` command line; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exit_.code or 0)
    try:
        return _demo_command(args) if args.command == "demo" else _inspect_command(args)
    except BrokenPipeError:  # `adalora inspect ... | head`: stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
