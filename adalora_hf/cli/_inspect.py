"""Read a saved AdaLoRA adapter (ours or PEFT's) without loading a model: ranks, sizes, table.

Only ``json`` and ``safetensors`` are used (tensor shapes come from the safetensors header; no
tensor is loaded), so inspecting needs neither the base model nor torch. PEFT's layout, which
``AdaLoraModel.save_pretrained`` writes too:

- ``adapter_config.json``: ``"peft_type": "ADALORA"``, ``init_r``, ``target_r``, ... and
  ``rank_pattern`` (``{"<module>.lora_E": [bool, ...]}``, True = triplet kept), or null when
  the adapter was saved before the first allocation;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A`` ``(r, in)``, ``lora_E``
  ``(r, 1)``, ``lora_B`` ``(out, r)``, shrunk to the kept triplets, plus the full weights of
  ``modules_to_save`` (e.g. a classifier head).

The rank of a module is the number of True entries of its ``rank_pattern`` entry when there is
one, else the number of rows of its ``lora_E`` (or ``lora_A``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._serialization import CONFIG_NAME, PEFT_PREFIX, PICKLE_NAME, WEIGHTS_NAME
from ._module_order import module_key

__all__ = [
    "AdapterError",
    "AdapterSummary",
    "ModuleRank",
    "format_adapter_table",
    "read_adapter",
]

_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AEB])(?:\.[^.]+)?$")


class AdapterError(Exception):
    """The path is not a readable AdaLoRA adapter; the message says what is wrong."""


@dataclass(frozen=True)
class ModuleRank:
    """One adapted matrix: its kept rank and shapes (``in``/``out`` of ``B·diag(E)·A``)."""

    name: str  # module path inside the base model, e.g. "vit.layers.0.attention.q_proj"
    rank: int  # kept triplets
    rows: int  # rows stored in the file (= rank once PEFT/our save shrank the adapter)
    in_features: int  # columns of lora_A
    out_features: int  # rows of lora_B

    @property
    def params(self) -> int:
        """Parameters of the kept triplets: ``rank · (in + out + 1)``."""
        return self.rank * (self.in_features + self.out_features + 1)


@dataclass
class AdapterSummary:
    """What ``read_adapter`` finds in an adapter directory."""

    path: Path
    config: dict[str, Any]
    modules: list[ModuleRank]
    rank_source: str  # "rank_pattern" or "weights"
    other_params: dict[str, int] = field(default_factory=dict)  # modules_to_save tensors
    file_params: int = 0  # every tensor in adapter_model.safetensors

    @property
    def total_rank(self) -> int:
        """Kept triplets over all matrices (the final budget after training)."""
        return sum(m.rank for m in self.modules)

    @property
    def adapter_params(self) -> int:
        """Parameters of the kept triplets over all matrices."""
        return sum(m.params for m in self.modules)


def _load_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterError(f"{path}: no such file or directory.")
    if not path.is_dir():
        raise AdapterError(
            f"{path} is a file: pass the adapter directory (the one holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}, as written by save_pretrained)."
        )
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterError(
            f"{path} is not an adapter directory: it has no {CONFIG_NAME} (pass the directory "
            "written by save_pretrained)."
        )
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{cfg_file} is not valid JSON: {err}.") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file} does not hold a JSON object.")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "ADALORA":
        raise AdapterError(
            f"{path} holds a {peft_type!r} adapter, not an AdaLoRA one (its {CONFIG_NAME} must "
            'say "peft_type": "ADALORA").'
        )
    return config


def _read_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file (read from its header)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as err:  # pragma: no cover - safetensors comes with the hf extra
        raise AdapterError(f"reading adapters needs safetensors ({err}).") from None
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(weights), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[key] = tuple(f.get_slice(key).get_shape())
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights} is not a readable safetensors file: {err}.") from None
    return shapes


def _module_name(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A[.<adapter>]`` -> (module, "A"); None for other keys."""
    match = _PART.match(key.removeprefix(PEFT_PREFIX))
    return None if match is None else (match.group("module"), match.group("part"))


def _pattern_ranks(config: dict[str, Any]) -> dict[str, int]:
    pattern = config.get("rank_pattern")
    if not pattern:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"rank_pattern in {CONFIG_NAME} is not a mapping: {str(pattern)[:80]}.")
    ranks: dict[str, int] = {}
    for key, keep in pattern.items():
        if not isinstance(keep, list):
            raise AdapterError(f"rank_pattern[{key!r}] is not a list of booleans.")
        # "<module>.lora_E" or "<module>.lora_E.<adapter>"
        module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
        ranks[module] = sum(bool(b) for b in keep)
    return ranks


def read_adapter(path: str | Path) -> AdapterSummary:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from ``path``.

    Raises ``AdapterError`` with a message naming the problem when ``path`` is missing, is not
    a directory, has no config, is not an AdaLoRA adapter (``peft_type``), or has no readable
    safetensors weights (``adapter_model.bin`` is refused: it is a pickle).
    """
    path = Path(path)
    config = _load_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = (
            f" (it has {PICKLE_NAME}, a pickle, which is not read here: re-save the adapter "
            "with safe_serialization=True)"
            if (path / PICKLE_NAME).exists()
            else ""
        )
        raise AdapterError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}{hint}.")
    shapes = _read_shapes(weights)

    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    other: dict[str, int] = {}
    for key, shape in shapes.items():
        named = _module_name(key)
        if named is None:
            other[key.removeprefix(PEFT_PREFIX)] = math.prod(shape)
        else:
            parts.setdefault(named[0], {})[named[1]] = shape
    if not parts:
        raise AdapterError(f"{weights} holds no lora_A / lora_E / lora_B tensors.")

    pattern = _pattern_ranks(config)
    modules = []
    for name in sorted(parts, key=module_key):
        p = parts[name]
        if "A" not in p or "B" not in p or len(p["A"]) != 2 or len(p["B"]) < 2:
            raise AdapterError(f"{weights}: module {name!r} lacks a 2-D lora_A or lora_B.")
        rows = p["E"][0] if "E" in p else p["A"][0]
        rank = pattern.get(name, rows)
        in_features = p["A"][1]
        out_features = p["B"][0]
        modules.append(ModuleRank(name, rank, rows, in_features, out_features))
    source = "rank_pattern" if pattern and all(m.name in pattern for m in modules) else "weights"
    return AdapterSummary(
        path=path,
        config=config,
        modules=modules,
        rank_source=source,
        other_params=other,
        file_params=sum(math.prod(s) for s in shapes.values()),
    )


def format_adapter_table(summary: AdapterSummary) -> str:
    """A plain-text table: one row per adapted matrix, then totals and parameter counts."""
    cfg = summary.config
    width = max([len("module"), *(len(m.name) for m in summary.modules)])
    lines = [
        f"AdaLoRA adapter at {summary.path}",
        f"init_r={cfg.get('init_r')} target_r={cfg.get('target_r')} "
        f"lora_alpha={cfg.get('lora_alpha')} total_step={cfg.get('total_step')} "
        f"(ranks from {summary.rank_source})",
        "",
        f"{'module':<{width}}  {'rank':>4}  {'in':>6}  {'out':>6}  {'params':>9}",
        f"{'-' * width}  {'-' * 4}  {'-' * 6}  {'-' * 6}  {'-' * 9}",
    ]
    for m in summary.modules:
        lines.append(
            f"{m.name:<{width}}  {m.rank:>4}  {m.in_features:>6}  {m.out_features:>6}  "
            f"{m.params:>9,}"
        )
    n = len(summary.modules)
    init_r, target_r = cfg.get("init_r"), cfg.get("target_r")
    lines += [
        f"{'-' * width}  {'-' * 4}  {'-' * 6}  {'-' * 6}  {'-' * 9}",
        f"{'total (' + str(n) + ' matrices)':<{width}}  {summary.total_rank:>4}  "
        f"{'':>6}  {'':>6}  {summary.adapter_params:>9,}",
    ]
    if isinstance(init_r, int) and isinstance(target_r, int):
        lines.append(
            f"budget: initial init_r·n = {init_r * n}, target target_r·n = {target_r * n}, "
            f"kept {summary.total_rank}"
        )
    if summary.other_params:
        lines.append(
            f"modules_to_save: {sum(summary.other_params.values()):,} parameters in "
            f"{len(summary.other_params)} tensors ({', '.join(sorted(summary.other_params))})"
        )
    lines.append(f"parameters in {WEIGHTS_NAME}: {summary.file_params:,}")
    return "\n".join(lines)
