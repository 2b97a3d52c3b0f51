"""PEFT's keyword arguments of ``save_pretrained`` / ``load_adapter`` / ``from_pretrained``:
which ones adalora honours, which are no-ops, and which it refuses (with a ``ValueError``
saying why, never silently). docs/migrating-from-peft.md lists the same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_device_map", "check_load_keywords", "check_save_keywords"]


def _refuse_extra(kwargs: Mapping[str, Any], where: str) -> None:
    if kwargs:
        raise ValueError(
            f"{where} got keywords adalora does not support: {sorted(kwargs)}. Adapters are "
            "read from and written to local directories only (nothing is downloaded; use "
            "push_to_hub to upload)."
        )


def check_save_keywords(
    save_embedding_layers: str | bool,
    path_initial_model_for_weight_conversion: str | None,
    kwargs: Mapping[str, Any],
) -> None:
    """Refuse what ``save_pretrained`` cannot honour: saving embedding layers
    (``save_embedding_layers=True``; ``"auto"`` and ``False`` save none, as PEFT does for an
    adapter that does not resize embeddings), PiSSA/OLoRA weight conversion, other keywords."""
    if save_embedding_layers not in ("auto", False):
        raise ValueError(
            f"save_embedding_layers={save_embedding_layers!r}: adalora never resizes or "
            "trains embedding layers outside the adapter, so there is nothing to save; leave "
            "it 'auto' (or False), or put the layer in modules_to_save."
        )
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError(
            "path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters to LoRA; "
            "AdaLoRA adapters have no such initialisation: leave it None."
        )
    _refuse_extra(kwargs, "save_pretrained")


def check_load_keywords(
    ephemeral_gpu_offload: bool,
    key_mapping: Mapping[str, str] | None,
    kwargs: Mapping[str, Any],
) -> None:
    """Refuse what loading cannot honour; ``low_cpu_mem_usage`` only changes speed in PEFT
    and is accepted either way."""
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True is not supported by adalora; leave it False.")
    if key_mapping:
        raise ValueError(
            "key_mapping is not supported: adalora reads PEFT's key names as saved; rename the "
            "keys of the file instead."
        )
    _refuse_extra({k: v for k, v in kwargs.items() if k != "device_map"}, "load_adapter")


def check_device_map(device_map: Any, model: nn.Module) -> None:
    """PEFT's ``device_map`` when loading: the adapter's tensors go to each layer's device
    here, so only a map that puts everything on the device the model already has is honoured
    (``None``, ``"cpu"``, ``{"": "cpu"}``, ...); anything else is a ``ValueError``."""
    if device_map is None:
        return
    single = (
        device_map.get("")
        if isinstance(device_map, Mapping) and len(device_map) == 1
        else device_map
    )
    devices = {p.device for p in model.parameters()}
    try:
        wanted = torch.device(single)  # type: ignore[arg-type]
    except (TypeError, RuntimeError):
        wanted = None
    if wanted is None or devices != {wanted}:
        raise ValueError(
            f"device_map={device_map!r} is not supported by adalora for a model on "
            f"{sorted(map(str, devices))}: load the base model with its device_map "
            "(transformers' from_pretrained) and the adapter follows each layer's device."
        )
