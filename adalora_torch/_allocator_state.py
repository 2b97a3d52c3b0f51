"""The file format of ``RankAllocator.state_dict``: its keys, and the checks a saved state
passes before an allocator takes it (``load_state_dict`` changes nothing when one fails)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["CONFIG_KEYS", "FORMAT", "KINDS", "STATE_KEYS", "check_state"]

FORMAT = "adalora_torch.RankAllocator/1"
KINDS = ("lora_A", "lora_E", "lora_B")  # EMA keys are "<module>.<kind>"
CONFIG_KEYS = ("target_r", "tinit", "tfinal", "total_step", "deltaT", "beta1", "beta2")
STATE_KEYS = (
    "adapter_name",
    "module_names",
    "ranks",
    "config",
    "step",
    "budget",
    "finalized",
    "skipped_steps",
    "keep",
    "rank_pattern",
    "ema_sensitivity",
    "ema_uncertainty",
)


def check_state(
    sd: Any,
    *,
    adapter_name: str,
    names: Sequence[str],
    ranks: Sequence[int],
    config: Mapping[str, Any],
) -> tuple[int | None, np.ndarray]:
    """Check a saved allocator state against the allocator that loads it: format, keys,
    adapter, modules and ranks, settings (``config``: ``CONFIG_KEYS`` -> value here; a
    ``total_step`` of None here takes the saved one) and the keep-mask's length. Returns the
    ``total_step`` to use and the keep-mask; ``ValueError`` saying what differs otherwise."""
    init_budget = int(sum(ranks))
    if not isinstance(sd, Mapping) or sd.get("format") != FORMAT:
        raise ValueError(f"Not a RankAllocator state dict (expected format {FORMAT!r}).")
    missing = [k for k in STATE_KEYS if k not in sd]
    if missing:
        raise ValueError(f"The allocator state dict lacks {missing}.")
    if sd["adapter_name"] != adapter_name:
        raise ValueError(
            f"The state is for adapter {sd['adapter_name']!r}, this allocator tracks "
            f"{adapter_name!r}: build it with adapter_name={sd['adapter_name']!r}."
        )
    if list(sd["module_names"]) != list(names) or list(sd["ranks"]) != list(ranks):
        saved = dict(zip(sd["module_names"], sd["ranks"]))
        ours = dict(zip(list(names), list(ranks)))
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        raise ValueError(
            "The state was saved for other adapted modules or ranks (module, saved rank, "
            f"rank here): {[(k, saved.get(k), ours.get(k)) for k in diff[:8]]}"
            + (" (order differs)" if not diff else "")
            + "."
        )
    saved, mine = dict(sd["config"]), dict(config)
    if mine["total_step"] is None:
        mine["total_step"] = saved.get("total_step")
    changed = {k: (saved.get(k), mine[k]) for k in CONFIG_KEYS if saved.get(k) != mine[k]}
    if changed:
        raise ValueError(
            f"The state was saved with other allocator settings ({{name: (saved, here)}}: "
            f"{changed}); build the allocator with the saved settings to resume."
        )
    keep = np.asarray(sd["keep"], dtype=bool).reshape(-1)
    if keep.shape != (init_budget,):
        raise ValueError(f"keep has {keep.shape[0]} entries, expected {init_budget}.")
    return mine["total_step"], keep
