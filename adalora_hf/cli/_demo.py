"""``adalora demo``: AdaLoRA against LoRA and a linear head, offline, in seconds on a CPU.

The setting is transfer learning in miniature. A tiny ViT (8×8 greyscale images, 2×2 patches)
is pretrained from scratch on scikit-learn's handwritten digits 0-4 (the data ships with
scikit-learn, nothing is downloaded) and cached. Its backbone is then frozen and adapted to the
*other* digits, 5-9, with a new classification head, three ways:

a) AdaLoRA through the library's own API (``AdaLoraConfig`` + ``AdaLoraModel``,
   ``update_and_allocate`` after every optimizer step), on every linear layer of the encoder,
   from ``init_r`` 8 down to a low final budget (``target_r`` 1, an eighth of the start:
   rank allocation matters most at low budgets);
b) plain LoRA at the same final number of adapter parameters (rank ``target_r`` everywhere);
c) plain LoRA at AdaLoRA's initial rank (``init_r`` everywhere, eight times the parameters):
   the ceiling AdaLoRA prunes from;
d) the new head alone (a linear probe).

The main metric is the test cross-entropy (continuous, lower is better); accuracy is beside
it. ``paired_differences`` compares AdaLoRA with the LoRA rows seed by seed (``--seeds N``).

This module runs the whole demo and writes what it measured; the pieces are in ``_data``
(digits, batches), ``_backbone`` (pretraining and its cache), ``_runs`` (the three runs) and
``_plots``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._backbone import Recipe, default_cache_dir, pretrained_backbone
from ._data import accuracy, digits
from ._inspect import AdapterSummary
from ._plots import plot_budget_and_loss, plot_rank_heatmap
from ._runs import DemoSettings, MethodResult, count, run_adalora, run_head, run_lora

__all__ = ["DemoResult", "paired_differences", "resolve_device", "run_demo"]


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote."""

    rows: list[MethodResult]
    budgets: list[int]
    settings: DemoSettings
    recipe: Recipe
    pretrain_accuracy: float
    pretrain_cached: bool
    out: Path
    adapter: AdapterSummary
    reloaded_accuracy: float  # the saved adapter reloaded onto the backbone

    def table(self) -> str:
        """The results as a plain-text table."""
        head = (
            f"{'method':<9}  {'test CE':>7}  {'test acc':>8}  {'adapter params':>14}  "
            f"{'head params':>11}  {'trained params':>14}  {'time (s)':>8}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.method:<9}  {r.test_loss:>7.4f}  {r.accuracy:>8.4f}  {r.adapter_params:>14,}  "
                f"{r.head_params:>11,}  {r.trained_params:>14,}  {r.seconds:>8.1f}"
            )
        return "\n".join(lines)

    def row(self, method: str) -> MethodResult:
        """The row of ``method`` (``AdaLoRA``, ``LoRA r=<rank>`` or ``head``)."""
        return next(r for r in self.rows if r.method == method)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.4f} ± {sd:.4f}"


def paired_differences(results: list[DemoResult]) -> list[str]:
    """Seed by seed (same split, initialisation and batches): AdaLoRA's test cross-entropy and
    accuracy minus LoRA's at equal final parameters (``target_r``), the share of the gap to
    LoRA at ``init_r`` (the ceiling) it closes (mean paired improvement over mean paired gap:
    1 = as good as the ceiling), and a plain verdict."""
    s = results[0].settings
    low, high = f"LoRA r={s.target_r}", f"LoRA r={s.init_r}"
    ce = [r.row("AdaLoRA").test_loss - r.row(low).test_loss for r in results]
    acc = [r.row("AdaLoRA").accuracy - r.row(low).accuracy for r in results]
    gap = statistics.mean(r.row(low).test_loss - r.row(high).test_loss for r in results)
    n = len(results)
    wins = sum(d < 0 for d in ce)
    lines = [
        f"AdaLoRA - {low} (equal final parameters), paired over {n} seed(s):",
        f"  test CE  {_mean_sd(ce)}  ({' '.join(f'{d:+.4f}' for d in ce)}; lower is better)",
        f"  test acc {_mean_sd(acc)}  ({' '.join(f'{d:+.4f}' for d in acc)})",
    ]
    if gap > 0:  # the ceiling is better on average: how much of its lead AdaLoRA recovers
        lines.append(
            f"  share of the CE gap {low} -> {high} closed: {-statistics.mean(ce) / gap:.2f}"
        )
    seeds = "this seed" if n == 1 else f"all {n} seeds"
    if wins == n:
        verdict = f"AdaLoRA beats {low} at equal final parameters on test CE ({seeds})."
    elif wins == 0:
        verdict = f"AdaLoRA does NOT beat {low} at equal final parameters here ({seeds})."
    else:
        verdict = (
            f"AdaLoRA beats {low} at equal final parameters in {wins} of {n} seeds only: "
            "no clear difference here."
        )
    return [*lines, verdict]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error when there is none) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}.")
    return torch.device(name)


def run_demo(
    *,
    settings: DemoSettings,
    seed: int = 0,
    out: Path = Path("adalora-demo"),
    device: str = "auto",
    recipe: Recipe | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Pretrain (or load) the backbone, fine-tune it four ways, write adapter, plots, results.

    On CPU, torch runs single-threaded while the demo runs (restored afterwards): the matrices
    are 48×48, so threads only add overhead, and float sums, hence the numbers, would otherwise
    depend on the number of cores.
    """
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run_demo(
            settings, seed, Path(out), dev, recipe or Recipe(), cache_dir, progress, log
        )
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    settings: DemoSettings,
    seed: int,
    out: Path,
    dev: torch.device,
    recipe: Recipe,
    cache_dir: Path | None,
    progress: bool,
    log: Callable[[str], None],
) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = digits(dev, seed, settings.test_size)
    cache = cache_dir or default_cache_dir()
    base, cached = pretrained_backbone(recipe, data, cache, progress)
    base.requires_grad_(False)
    pre_acc = accuracy(base, data["pretrain_test"])
    log(
        f"backbone: ViT {recipe.num_hidden_layers} layers x {recipe.hidden_size} wide, "
        f"{count(base.parameters()):,} parameters, pretrained on digits 0-4 "
        f"({'cached' if cached else 'built now'}; held-out accuracy {pre_acc:.4f})"
    )
    log(
        f"task: digits 5-9, {len(data['train'].y)} training / {len(data['test'].y)} test "
        f"images, {settings.steps} steps, seed {seed}, device {dev}"
    )
    ada, budgets, summary, reloaded = run_adalora(base, data, settings, seed, progress, out)
    log(
        f"AdaLoRA adapter saved and reloaded with AdaLoraModel.from_pretrained: test accuracy "
        f"{reloaded:.4f} ({'identical' if reloaded == ada.accuracy else 'DIFFERENT'})"
    )
    lora = run_lora(base, data, settings, seed, progress)
    ceiling = run_lora(base, data, settings, seed, progress, rank=settings.init_r)
    head = run_head(base, data, settings, seed, progress)
    result = DemoResult(
        rows=[ada, lora, ceiling, head],
        budgets=budgets,
        settings=settings,
        recipe=recipe,
        pretrain_accuracy=pre_acc,
        pretrain_cached=cached,
        out=out,
        adapter=summary,
        reloaded_accuracy=reloaded,
    )
    ranks = {m.name: m.rank for m in summary.modules}
    plot_rank_heatmap(
        ranks,
        out / "ranks.png",
        init_r=settings.init_r,
        title=f"AdaLoRA final rank per layer and module ({summary.total_rank} of "
        f"{settings.init_r * len(ranks)} triplets kept)",
    )
    plot_budget_and_loss(result, out / "budget_loss.png")
    (out / "results.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "settings": asdict(settings),
                "recipe": asdict(recipe),
                "pretrain_accuracy": pre_acc,
                "reloaded_accuracy": reloaded,
                "rows": [
                    {k: v for k, v in asdict(r).items() if k != "losses"} for r in result.rows
                ],
                "rank_pattern": ranks,
            },
            indent=2,
        )
    )
    return result
