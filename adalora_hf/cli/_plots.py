"""The demo's and ``adalora inspect``'s figures: the rank budget and training loss of a demo
run, and the heatmap of the rank kept per layer and module of an adapter. matplotlib is
imported only when a figure is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ._module_order import kind_key, split_layer

if TYPE_CHECKING:
    from ._demo import DemoResult

__all__ = ["plot_budget_and_loss", "plot_rank_heatmap", "rank_grid"]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_budget_and_loss(result: DemoResult, path: Path) -> Path:
    """Two panels over the AdaLoRA run: the rank budget (with its phases) and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.settings
    steps = list(range(1, len(result.budgets) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    top.step(steps, result.budgets, where="post", color="tab:blue", label="budget (triplets)")
    for ax in (top, bottom):
        ax.axvspan(0, s.tinit, color="0.92", zorder=0)
        ax.axvspan(s.steps - s.tfinal, s.steps, color="0.92", zorder=0)
        ax.grid(alpha=0.3)
    top.text(
        s.tinit / 2,
        0.5,
        "warm-up",
        transform=top.get_xaxis_transform(),
        ha="center",
        rotation=90,
        color="0.4",
    )
    top.text(
        s.steps - s.tfinal / 2,
        0.5,
        "final",
        transform=top.get_xaxis_transform(),
        ha="center",
        rotation=90,
        color="0.4",
    )
    top.set_ylabel("total rank (triplets)")
    top.set_title(
        f"AdaLoRA budget: init_r={s.init_r} → target_r={s.target_r}, tinit={s.tinit}, "
        f"tfinal={s.tfinal}, deltaT={s.deltaT}",
        fontsize=10,
    )
    window = max(1, s.steps // 30)
    colours = ["tab:blue", "tab:orange", "tab:red", "tab:green"]
    for row, colour in zip(result.rows, colours):
        bottom.plot(steps[: len(row.losses)], row.losses, color=colour, alpha=0.2, lw=0.8)
        bottom.plot(
            steps[: len(row.losses)],
            _smooth(row.losses, window),
            color=colour,
            label=f"{row.method} (test CE {row.test_loss:.3f}, acc {row.accuracy:.3f})",
        )
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel(f"training cross-entropy\n(mean of {window} steps)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rank_grid(
    ranks: dict[str, int],
) -> tuple[list[str], list[str], list[list[float]]]:
    """Arrange ``{module: rank}`` as a layer × module-kind grid (NaN where a cell is absent)."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        layer, kind = split_layer(name)
        if layer not in rows:
            rows.append(layer)
        if kind not in cols:
            cols.append(kind)
        cells[(layer, kind)] = rank
    rows.sort(key=lambda r: (0, int(r)) if r.isdigit() else (1, 0))
    cols.sort(key=kind_key)
    grid = [[float(cells.get((r, c), math.nan)) for c in cols] for r in rows]
    return rows, cols, grid


def plot_rank_heatmap(
    ranks: dict[str, int],
    path: str | Path,
    *,
    title: str = "AdaLoRA: final rank per layer and module",
    init_r: int | None = None,
) -> Path:
    """Save a PNG heatmap of ``{module: rank}`` (rows: layer index, columns: module kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rows, cols, grid = rank_grid(ranks)
    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    vmax = init_r if init_r is not None else max(1, int(np.nanmax(np.array(grid))))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.6 + 0.45 * len(rows)))
    image = ax.imshow(data, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i][j]):
                value = int(grid[i][j])
                colour = "white" if value < 0.6 * vmax else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="rank (kept triplets)", ticks=MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
