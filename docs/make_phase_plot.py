"""Draw docs/phases.png: AdaLoRA's budget over training, from ``adalora_core.budget_schedule``.

Run from the repository root: ``python docs/make_phase_plot.py`` (needs numpy + matplotlib).
The settings are those of ``adalora demo``: 24 adapted matrices (4 ViT layers × 6 linear
layers), init_r=8, target_r=4, 300 steps, tinit=30, tfinal=60, deltaT=10.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from adalora_core import budget_schedule

N_MATRICES, INIT_R, TARGET_R = 24, 8, 4
TOTAL_STEP, TINIT, TFINAL, DELTA_T = 300, 30, 60, 10


def main(out: Path) -> None:
    """Compute the schedule at every step and save the figure to ``out``."""
    init_budget, target_budget = INIT_R * N_MATRICES, TARGET_R * N_MATRICES
    steps = list(range(1, TOTAL_STEP + 1))
    schedule = [
        budget_schedule(
            step,
            init_budget=init_budget,
            target_budget=target_budget,
            tinit=TINIT,
            tfinal=TFINAL,
            total_step=TOTAL_STEP,
            deltaT=DELTA_T,
        )
        for step in steps
    ]
    budgets = [b for b, _ in schedule]
    # masking steps of the budgeting phase (in the final phase every step re-applies the pattern)
    masked = [(s, b) for s, (b, m) in zip(steps, schedule) if m and s <= TOTAL_STEP - TFINAL]

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.step(steps, budgets, where="post", color="tab:blue", label="budget b(t) (triplets kept)")
    ax.plot(*zip(*masked), "o", ms=4, color="tab:red", label=f"allocation (every deltaT={DELTA_T})")
    ax.axvspan(0, TINIT, color="0.9", zorder=0)
    ax.axvspan(TOTAL_STEP - TFINAL, TOTAL_STEP, color="0.9", zorder=0)
    ax.axhline(init_budget, ls=":", color="0.5", lw=0.8)
    ax.axhline(target_budget, ls=":", color="0.5", lw=0.8)
    top = init_budget + 0.06 * (init_budget - target_budget)
    ax.text(TINIT / 2, top, "1) warm-up", ha="center", va="bottom", fontsize=9)
    ax.text((TINIT + TOTAL_STEP - TFINAL) / 2, top, "2) budgeting: cubic decrease", ha="center",
            va="bottom", fontsize=9)  # fmt: skip
    ax.text(TOTAL_STEP - TFINAL / 2, top, "3) final", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(target_budget - 0.15 * (init_budget - target_budget),
                init_budget + 0.2 * (init_budget - target_budget))  # fmt: skip
    ax.set_xlim(0, TOTAL_STEP)
    ax.set_yticks([target_budget, init_budget],
                  [f"target_r·n = {target_budget}", f"init_r·n = {init_budget}"])  # fmt: skip
    ax.set_xticks([0, TINIT, TOTAL_STEP - TFINAL, TOTAL_STEP],
                  ["0", "tinit", "total_step − tfinal", "total_step"])  # fmt: skip
    ax.set_xlabel(f"optimizer step (tinit={TINIT}, tfinal={TFINAL}, total_step={TOTAL_STEP})")
    ax.set_title(
        f"AdaLoRA budget schedule: {N_MATRICES} matrices, init_r={INIT_R} → target_r={TARGET_R}",
        fontsize=10,
    )
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("phases.png"))
