"""PEFT's adapter file format: key names, rank-pattern forms, shrinking, safetensors I/O.

On disk (``adapter_model.safetensors``) an AdaLoRA layer at ``<path>`` of the transformers
model is stored as ``base_model.model.<path>.lora_A|lora_E|lora_B`` without the adapter name
and without ``ranknum`` (it is always ``init_r``). When the config has a ``rank_pattern`` the
tensors are shrunk to the kept triplets (rows of A and E, columns of B), as PEFT's
``resize_state_dict_by_rank_pattern`` does. ``rank_pattern`` keys are ``<path>.lora_E`` on
disk and ``<path>.lora_E.<adapter>`` in a live PEFT model; both forms are accepted here.

This is the one module that knows PEFT's file and key names: the rest of the package names
tensors by their path in the transformers model (``<path>.lora_A``, ``<module>.<param>``) and
turns them into file keys with ``file_key`` / ``triplet_key`` (``_save_load`` saves and loads
adapters with them; ``to_peft_keys`` does it for ``adalora_torch.to_lora_state_dict``'s export).
See docs/design.md for the format.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ._io import write_file_atomic

__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "PICKLE_NAME",
    "STAMPED_FIELDS",
    "TRIPLET_KINDS",
    "WEIGHTS_NAME",
    "check_adapter_name",
    "check_config_stamp",
    "file_key",
    "load_weights",
    "module_masks",
    "pattern_key",
    "pickle_bytes",
    "read_weights",
    "save_weights",
    "shrink_state_dict",
    "to_peft_keys",
    "triplet_key",
    "weights_bytes",
]

CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # safe_serialization=False; read with weights_only=True
README_NAME = "README.md"  # the model card save_pretrained writes (see _model_card)
STAMP_KEY = "adalora_config"
# an adapter layer's tensors in the file (``ranknum`` is not saved: it is init_r)
TRIPLET_KINDS = ("lora_A", "lora_E", "lora_B")
# config fields that give the saved tensors their meaning (copied into the weights' metadata)
STAMPED_FIELDS = (
    "peft_type",
    "target_modules",
    "init_r",
    "lora_alpha",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
)


def check_adapter_name(adapter_name: object) -> str:
    """Return ``adapter_name`` if it can name an adapter, else raise ``ValueError``.

    An adapter name is part of parameter names (``lora_A.<adapter_name>``) and, when several
    adapters are saved, the name of a subdirectory (``<save_directory>/<adapter_name>``), so it
    must be one safe path component: a non-empty string without ``.`` (which also excludes
    ``.`` and ``..``), ``/``, ``\\`` or NUL (which excludes absolute paths).
    """
    bad = [c for c in (".", "/", "\\", "\0") if isinstance(adapter_name, str) and c in adapter_name]
    if not isinstance(adapter_name, str) or not adapter_name or bad:
        raise ValueError(
            f"adapter_name must be a non-empty string without '.', '/', '\\' or NUL, got "
            f"{adapter_name!r}: it becomes part of parameter names (lora_A.<adapter_name>) and "
            "the name of the subdirectory save_pretrained writes it into. Pick a plain name "
            "such as 'default' or 'task_b'."
        )
    return adapter_name


def file_key(name: str) -> str:
    """The file key of the tensor at ``name`` in the transformers model (``<module>.<param>``)."""
    return f"{PEFT_PREFIX}{name}"


def triplet_key(module: str, kind: str) -> str:
    """The file key of an adapter layer's ``kind`` (one of ``TRIPLET_KINDS``) at ``module``."""
    return file_key(f"{module}.{kind}")


def to_peft_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (keys relative to the transformers model, as ``adalora_torch.to_lora_state_dict``
    returns them) under the keys of PEFT's ``adapter_model.safetensors``.

    >>> list(to_peft_keys({"encoder.q.lora_A.weight": torch.zeros(1)}))
    ['base_model.model.encoder.q.lora_A.weight']
    """
    return {file_key(k): v for k, v in state.items()}


def pattern_key(module: str, adapter_name: str | None = None) -> str:
    """The ``rank_pattern`` key of a module: ``<module>.lora_E[.<adapter>]``."""
    return f"{module}.lora_E" if adapter_name is None else f"{module}.lora_E.{adapter_name}"


def _module_of_key(key: str, adapter_name: str) -> str:
    for suffix in (f".lora_E.{adapter_name}", ".lora_E"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(
        f"rank_pattern key {key!r} does not name a lora_E parameter: keys are "
        f"'<module>.lora_E' (as saved) or '<module>.lora_E.{adapter_name}' (as recorded)."
    )


def module_masks(
    rank_pattern: Mapping[str, Sequence[bool]] | None, adapter_name: str
) -> dict[str, list[bool]]:
    """``rank_pattern`` (either key form) as ``{module path: keep-mask}``."""
    if not rank_pattern:
        return {}
    return {_module_of_key(k, adapter_name): [bool(b) for b in v] for k, v in rank_pattern.items()}


def shrink_state_dict(
    state: dict[str, torch.Tensor], masks: Mapping[str, Sequence[bool]], prefix: str = PEFT_PREFIX
) -> dict[str, torch.Tensor]:
    """Keep only the triplets the masks keep (A, E rows; B columns); returns a new dict.

    A tensor whose rank already equals the number of kept triplets is left as is (the layer
    was shrunk before saving); one with another size is a ``ValueError``.
    """
    out = dict(state)
    for module, mask in masks.items():
        keep = torch.tensor(list(mask), dtype=torch.bool)
        n_keep = int(keep.sum())
        for name, dim in zip(TRIPLET_KINDS, (0, 0, 1)):
            key = f"{prefix}{module}.{name}"
            if key not in out:
                raise ValueError(f"rank_pattern names {module!r} but the adapter has no {key!r}.")
            t = out[key]
            if t.shape[dim] == n_keep:
                continue
            if t.shape[dim] != keep.numel():
                raise ValueError(
                    f"{key} has rank {t.shape[dim]} but its rank_pattern has {keep.numel()} "
                    f"entries ({n_keep} kept): the pattern belongs to another model or init_r."
                )
            out[key] = t.index_select(dim, keep.nonzero().view(-1).to(t.device))
    return out


def weights_bytes(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> bytes:
    """``adapter_model.safetensors`` as bytes (contiguous CPU copies, no shared storage).

    With ``config`` (the dict written to ``adapter_config.json``) the metadata also holds a
    copy of the fields that give the tensors their meaning (``adalora_config``), so that a
    weights file next to a config from another save is refused (``check_config_stamp``).
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata[STAMP_KEY] = _stamp(config)
    return bytes(save(tensors, metadata=metadata))


def pickle_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """``adapter_model.bin`` as bytes (``torch.save`` of contiguous CPU copies), what PEFT writes
    with ``safe_serialization=False``. It carries no config stamp (see ``weights_bytes``)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def save_weights(
    state: Mapping[str, torch.Tensor], directory: str, config: Mapping[str, Any] | None = None
) -> str:
    """Write ``adapter_model.safetensors`` into ``directory`` atomically (see ``_io``)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    write_file_atomic(path, weights_bytes(state, config))
    return path


def _stamp(config: Mapping[str, Any]) -> str:
    return json.dumps({k: config.get(k) for k in STAMPED_FIELDS}, sort_keys=True)


def check_config_stamp(metadata: Mapping[str, str], config: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` when the weights were saved with other values of the fields that
    give them their meaning than ``config`` has (files from two saves; files without the
    stamp, e.g. PEFT's, pass)."""
    raw = metadata.get(STAMP_KEY)
    if raw is None:
        return
    try:
        saved = json.loads(raw)
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{where}: the {STAMP_KEY!r} metadata of {WEIGHTS_NAME} is not a JSON object: the "
            "file is corrupted; save the adapter again."
        )
    now = json.loads(_stamp(config))
    differ = [k for k in STAMPED_FIELDS if k in saved and saved[k] != now[k]]
    if differ:
        raise ValueError(
            f"{where}: {WEIGHTS_NAME} and {CONFIG_NAME} come from different saves (they "
            f"disagree on {differ}): a save was interrupted between the two files, or "
            f"{CONFIG_NAME} was edited by hand. Save the adapter again, or put back the "
            f"{CONFIG_NAME} written with these weights."
        )


def read_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the adapter weights in ``directory``.

    ``adapter_model.safetensors`` is preferred; without it, PEFT's ``adapter_model.bin``
    (``safe_serialization=False``) is read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors and plain containers (no code runs), and has no metadata.
    Raises ``FileNotFoundError`` when neither is there, ``ValueError`` when the file is
    truncated, corrupted or not a mapping of tensors.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    hint = (
        "the file is truncated or corrupted (an interrupted copy or download?). Save or copy "
        "the adapter again."
    )
    if os.path.isfile(path):
        return read_safetensors(path, hint)
    pickled = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickled):
        return _read_pickle(pickled, hint), {}
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} (or {PICKLE_NAME}) in {directory!r}: pass the directory written by "
        "save_pretrained (nothing is downloaded from the Hub)."
    )


def _read_pickle(path: str, hint: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) ({err}): {hint} Only "
            "tensors are loaded from pickled files, never objects that run code."
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a mapping of names to tensors: {hint}")
    return state


def read_safetensors(path: str, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of the safetensors file ``path``; ``ValueError`` ending in
    ``hint`` (what is wrong and what to do) when it cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} cannot be read as safetensors ({err}): {hint}") from err
    return tensors, metadata


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read the adapter weights from ``directory`` (see ``read_weights``)."""
    return read_weights(directory)[0]
