"""Rank allocation of an ``AdaLoraModel``'s trainable adapter: the glue between the model,
its config and the ``adalora_torch.RankAllocator`` (``model.rankallocator``).

The functions take the ``AdaLoraModel`` and keep its ``rankallocator``,
``_allocator_total_step`` and ``peft_config[<trainable>]`` (``total_step``, ``rank_pattern``)
in step; the model's methods of the same names are thin calls into them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from adalora_torch import RankAllocator
from adalora_torch._layers import iter_svd_layers

from ._checkpoint import load_allocator_state, save_allocator_state
from ._config import AdaLoraConfig
from ._serialization import module_masks, pattern_key

if TYPE_CHECKING:
    from ._model import AdaLoraModel

__all__ = [
    "build_allocator",
    "load_state",
    "save_state",
    "set_total_step",
    "total_rank",
    "trainable_name",
    "update_and_allocate",
]


def build_allocator(model: nn.Module, cfg: AdaLoraConfig, adapter_name: str) -> RankAllocator:
    """The ``RankAllocator`` of ``adapter_name`` in ``model``, with ``cfg``'s schedule."""
    return RankAllocator(
        model,
        target_r=cfg.target_r,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        total_step=cfg.total_step,
        deltaT=cfg.deltaT,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        adapter_name=adapter_name,
    )


def trainable_name(owner: AdaLoraModel) -> str:
    """The trainable adapter's name; ``ValueError`` when every adapter is inference-only."""
    if owner.trainable_adapter_name is None or owner.rankallocator is None:
        raise ValueError(
            "This model has no trainable adapter (all adapters have inference_mode=True): "
            "load it with is_trainable=True or add an adapter with inference_mode=False."
        )
    return owner.trainable_adapter_name


def _record_pattern(cfg: AdaLoraConfig, pattern: dict[str, list[bool]], name: str) -> None:
    cfg.rank_pattern = {pattern_key(m, name): list(mask) for m, mask in pattern.items()}


def _sync_total_step(owner: AdaLoraModel, cfg: AdaLoraConfig) -> None:
    assert owner.rankallocator is not None and cfg.total_step is not None
    if cfg.total_step != owner._allocator_total_step:
        owner.rankallocator.set_total_step(cfg.total_step)
        owner._allocator_total_step = cfg.total_step
    if not owner._schedule_warned:  # once per model, when the schedule becomes known
        owner._schedule_warned = True
        cfg.warn_if_schedule_hurts()


def set_total_step(owner: AdaLoraModel, total_step: int) -> None:
    """Set ``total_step`` of the trainable adapter's config and allocator (checked first)."""
    cfg = owner.peft_config[trainable_name(owner)]
    old = cfg.total_step
    cfg.total_step = total_step
    try:
        cfg.check_schedule()
    except ValueError:
        cfg.total_step = old
        raise
    _sync_total_step(owner, cfg)


def update_and_allocate(owner: AdaLoraModel, global_step: int) -> int:
    """One allocator step (see ``AdaLoraModel.update_and_allocate``); records the pattern."""
    name = trainable_name(owner)
    cfg = owner.peft_config[name]
    cfg.check_schedule(require_total_step=True)
    _sync_total_step(owner, cfg)
    allocator = owner.rankallocator
    assert allocator is not None
    budget, pattern = allocator.update_and_allocate(global_step)
    owner._plain_lora.allocated()
    if pattern is None and cfg.rank_pattern is None:
        pattern = allocator.rank_pattern  # restored by rankallocator.load_state_dict
    if pattern is not None:
        _record_pattern(cfg, pattern, name)
    return budget


def save_state(owner: AdaLoraModel, directory: str | os.PathLike[str]) -> None:
    """Write the allocator's state into ``directory`` (see ``_checkpoint``)."""
    trainable_name(owner)
    assert owner.rankallocator is not None
    save_allocator_state(owner.rankallocator, os.fspath(directory))


def load_state(owner: AdaLoraModel, directory: str | os.PathLike[str]) -> bool:
    """Restore what ``save_state`` wrote; False when ``directory`` has none."""
    name = trainable_name(owner)
    allocator = owner.rankallocator
    assert allocator is not None
    cfg = owner.peft_config[name]
    if cfg.total_step is not None:
        _sync_total_step(owner, cfg)
    if not load_allocator_state(allocator, os.fspath(directory)):
        return False
    if cfg.total_step is None and allocator.total_step is not None:
        cfg.total_step = owner._allocator_total_step = allocator.total_step
    pattern = allocator.rank_pattern  # None: saved before the first allocation
    cfg.rank_pattern = None
    if pattern is not None:
        _record_pattern(cfg, pattern, name)
    owner._plain_lora.allocated()
    return True


def total_rank(owner: AdaLoraModel, adapter_name: str | None = None) -> int:
    """Triplets kept now over all matrices of an adapter (see ``AdaLoraModel.total_rank``)."""
    name = adapter_name or owner.trainable_adapter_name or owner.active_adapter
    masks = module_masks(owner.peft_config[name].rank_pattern, name)
    total = 0
    for path, layer in iter_svd_layers(owner.model, name):
        rank = int(layer.lora_E[name].shape[0])
        mask = masks.get(path)
        total += sum(mask) if mask is not None and len(mask) == rank else rank
    return total
