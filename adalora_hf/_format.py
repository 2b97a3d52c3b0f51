"""PEFT's adapter file format: key names, rank-pattern forms, shrinking, safetensors I/O.

On disk (``adapter_model.safetensors``) an AdaLoRA layer at ``<path>`` of the transformers
model is stored as ``base_model.model.<path>.lora_A|lora_E|lora_B`` without the adapter name
and without ``ranknum`` (it is always ``init_r``). When the config has a ``rank_pattern`` the
tensors are shrunk to the kept triplets (rows of A and E, columns of B), as PEFT's
``resize_state_dict_by_rank_pattern`` does. ``rank_pattern`` keys are ``<path>.lora_E`` on
disk and ``<path>.lora_E.<adapter>`` in a live PEFT model; both forms are accepted here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "load_weights",
    "module_masks",
    "pattern_key",
    "save_weights",
    "shrink_state_dict",
]

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAME = "adapter_model.bin"


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
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
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


def save_weights(state: Mapping[str, torch.Tensor], directory: str) -> str:
    """Write ``adapter_model.safetensors`` (contiguous CPU copies, no shared storage)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = os.path.join(directory, WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` from ``directory``; pickled files are refused."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, _PICKLE_NAME)):
            raise ValueError(
                f"{directory!r} holds only {_PICKLE_NAME} (pickle), which adalora never loads: "
                "re-save the adapter with safetensors (PEFT: save_pretrained(..., "
                "safe_serialization=True), the default)."
            )
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {directory!r}: pass the directory written by save_pretrained "
            "(nothing is downloaded from the Hub)."
        )
    return load_file(path)
