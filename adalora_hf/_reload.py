"""Loading an adapter under a name the model already has: its weights are replaced in place.

PEFT's ``load_adapter(path, name)`` with a ``name`` the model has keeps the adapter (its config,
whether it trains, whether it is active) and loads the file's tensors into it; the Trainer and
PEFT's examples reload the best checkpoint this way. Here the file is checked against the live
adapter first (every tensor present, nothing extra, shapes, finite values) and the model changes
only when all fits. A file saved with a ``rank_pattern`` (tensors shrunk to the kept triplets)
fits a live adapter of full rank: the kept triplets go to the pattern's positions and the
others are zero, which is what the pattern's mask means, and the pattern is recorded in the
live config.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from adalora_torch._layers import iter_svd_layers

from ._config import AdaLoraConfig
from ._modules_to_save import wrappers
from ._serialization import (
    CONFIG_NAME,
    PEFT_PREFIX,
    TRIPLET_KINDS,
    check_config_stamp,
    file_key,
    module_masks,
    pattern_key,
    read_weights,
    triplet_key,
)

if TYPE_CHECKING:
    from ._model import AdaLoraModel

__all__ = ["LoadResult", "live_tensors", "reload_weights"]

_RANK_DIM = dict(zip(TRIPLET_KINDS, (0, 0, 1)))


class LoadResult(NamedTuple):
    """What ``load_adapter`` returns, as PEFT: the adapter keys the file lacked and the file's
    keys the model had no place for. Both are empty: a file that does not fit exactly is
    refused with a ``ValueError`` before the model changes."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def live_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> the live tensor of an adapter: its triplets and ``modules_to_save`` copies."""
    targets: dict[str, torch.Tensor] = {}
    for path, layer in iter_svd_layers(model, adapter_name):
        for kind in TRIPLET_KINDS:
            targets[triplet_key(path, kind)] = getattr(layer, kind)[adapter_name]
    for path, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            copy_ = wrapper.modules_to_save[adapter_name]
            for k, v in copy_.state_dict(keep_vars=True).items():
                targets[file_key(f"{path}.{k}")] = v
    return targets


def _expand(value: torch.Tensor, mask: list[bool], kind: str) -> torch.Tensor:
    dim = _RANK_DIM[kind]
    shape = list(value.shape)
    shape[dim] = len(mask)
    out = value.new_zeros(shape)
    index = torch.tensor([i for i, keep in enumerate(mask) if keep], dtype=torch.long)
    return out.index_copy(dim, index, value)


def reload_weights(
    owner: AdaLoraModel, model_id: str | os.PathLike[str], adapter_name: str
) -> LoadResult:
    """Replace the tensors of the existing adapter ``adapter_name`` by those saved at
    ``model_id`` (see the module docstring); ``ValueError`` when they do not fit."""
    path = os.fspath(model_id)
    if os.path.isfile(path):
        raise ValueError(f"{path!r} is a file: pass the adapter's directory.")
    config = AdaLoraConfig.from_pretrained(path)
    weights, metadata = read_weights(path)
    check_config_stamp(metadata, config.to_dict(), path)
    masks = module_masks(config.rank_pattern, adapter_name)
    live = live_tensors(owner.model, adapter_name)
    named = {file_key(n): p for n, p in owner.model.named_parameters()}
    ready: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in weights.items():
        dst = live.get(key, named.get(key))
        if dst is None:
            raise ValueError(
                f"{path}: {key} has no place in adapter {adapter_name!r} of this model: the "
                f"file belongs to another base model or target_modules (see its {CONFIG_NAME})."
            )
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".")
        mask = masks.get(module) if kind in _RANK_DIM and value.shape != dst.shape else None
        if mask and value.dim() == dst.dim() and value.shape[_RANK_DIM[kind]] == sum(mask):
            value = _expand(value, mask, kind)
        if tuple(value.shape) != tuple(dst.shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} in the file, adapter "
                f"{adapter_name!r} has {tuple(dst.shape)}: the file was saved with another "
                "init_r, base model or rank pattern."
            )
        if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: {key} is not a finite floating-point tensor.")
        ready[key] = (dst, value)
    missing = [k for k in live if k not in weights]
    if missing:
        raise ValueError(
            f"{path}: the adapter file lacks {len(missing)} tensors of adapter "
            f"{adapter_name!r}, e.g. {missing[:3]}: it was saved for another base model or "
            "target_modules."
        )
    with torch.no_grad():
        for dst, value in ready.values():
            dst.copy_(value.to(dst.device, dst.dtype))
    if masks:
        cfg = owner.peft_config[adapter_name]
        cfg.rank_pattern = {pattern_key(m, adapter_name): v for m, v in masks.items()}
    return LoadResult([], [])
