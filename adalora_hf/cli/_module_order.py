"""Where an adapted module sits in its model (layer index, module kind) and the order the
adapter table and the rank heatmap list modules in: by layer, then attention q, k, v, output,
then MLP in, MLP out, then the rest."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["kind_key", "module_key", "split_layer"]

# column order of the heatmap: attention q, k, v, output, then MLP in, MLP out, then the rest
_KIND_ORDER = (
    {"q", "q_proj", "query", "query_proj"},
    {"k", "k_proj", "key", "key_proj"},
    {"v", "v_proj", "value", "value_proj"},
    {"o", "o_proj", "out_proj"},
    {"fc1", "gate_proj", "up_proj", "wi", "wi_0", "wi_1", "w1", "w3", "c_fc", "intermediate"},
    {"fc2", "down_proj", "wo", "w2", "output"},
)


def split_layer(name: str) -> tuple[str, str]:
    """``vit.layers.3.attention.q_proj`` -> ("3", "attention.q_proj"); no index -> ("-", name)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return parts[i], ".".join(parts[i + 1 :]) or name
    return "-", name


def kind_key(kind: str) -> tuple[int, str]:
    """Sort key of a module kind (the part of the name after the layer index)."""
    parts = kind.split(".")
    last = parts[-1]
    if last == "dense":  # BERT: attention.output.dense, intermediate.dense, output.dense
        last = "o" if "attention" in parts else parts[0]
    for i, names in enumerate(_KIND_ORDER):
        if last in names:
            return i, kind
    return len(_KIND_ORDER), kind


def module_key(name: str) -> tuple[list[Any], tuple[int, str]]:
    """Sort key of a module name: by layer (numerically), then by kind."""
    _, kind = split_layer(name)
    return _natural_key(name.removesuffix(kind)), kind_key(kind)


def _natural_key(name: str) -> list[Any]:
    # "layers.10" after "layers.9"
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]
