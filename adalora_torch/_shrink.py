"""After the final allocation: shrink the adapter to its surviving triplets, or export it.

The allocator zeroes E of the dropped triplets, so removing them (``shrink_to_pattern``) or
folding the survivors into a plain LoRA pair (``to_lora_state_dict``) leaves outputs as they
are, while compute and memory shrink to the kept ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._layers import SVDConv2d, SVDEmbedding, iter_svd_layers

__all__ = ["shrink_to_pattern", "to_lora_state_dict"]


def _move_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    keep: torch.Tensor,
    dim: int,
) -> None:
    # the new Parameter takes the old one's place in its group; per-element state follows it
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    moved = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            moved[key] = value.index_select(dim, keep.nonzero().reshape(-1).to(value.device))
        else:
            moved[key] = value  # e.g. Adam's scalar 'step'
    optimizer.state[new] = moved


def shrink_to_pattern(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    adapter_name: str = "default",
    rank_pattern: Mapping[str, Sequence[bool]] | None = None,
) -> dict[str, int]:
    """Physically remove the masked triplets of ``adapter_name`` from every SVD layer.

    The keep-mask of a layer is ``rank_pattern[module name]`` when a pattern is given, else the
    layer's ``keep[adapter_name]`` written by the rank allocator. Masked triplets have E = 0,
    so outputs do not change. With ``optimizer``, the new A, E, B Parameters replace the old
    ones in its param groups and their per-element state (Adam's ``exp_avg``, ``exp_avg_sq``)
    is sliced along the rank dimension (scalars such as ``step`` are copied), so training
    continues where it was. Returns module name -> kept rank.

    Call it after the final allocation::

        allocator.update_and_allocate(step)   # at or after total_step - tfinal
        shrink_to_pattern(model, optimizer)
    """
    layers = list(iter_svd_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"The model has no SVD adapter layer with adapter {adapter_name!r}.")
    masks: dict[str, object] = {}
    for name, layer in layers:
        if rank_pattern is not None:
            if name not in rank_pattern:
                raise ValueError(
                    f"rank_pattern has no entry for {name!r}; give a mask for every adapted "
                    f"module (keys are module names, e.g. {[n for n, _ in layers[:3]]})."
                )
            masks[name] = rank_pattern[name]
        else:
            keep = getattr(layer, "keep", {}).get(adapter_name)
            if keep is None:
                raise ValueError(
                    f"Layer {name!r} has no keep-mask for adapter {adapter_name!r}: call "
                    "shrink_to_pattern after the final allocation, or pass rank_pattern."
                )
            masks[name] = keep
    kept: dict[str, int] = {}
    for name, layer in layers:
        a = layer.lora_A[adapter_name]
        mask = torch.as_tensor(masks[name], dtype=torch.bool, device=a.device).reshape(-1)
        if mask.numel() != a.shape[0]:
            raise ValueError(
                f"The mask for {name!r} has {mask.numel()} entries, the layer has rank "
                f"{a.shape[0]}; it must come from this model's allocation."
            )
        old = [(layer.lora_A, 0), (layer.lora_E, 0), (layer.lora_B, 1)]
        old_params = [d[adapter_name] for d, _ in old]
        layer.set_rank(adapter_name, mask)
        if optimizer is not None:
            for (d, dim), p in zip(old, old_params):
                _move_optimizer_state(optimizer, p, d[adapter_name], mask, dim)
        kept[name] = int(mask.sum())
    return kept


def to_lora_state_dict(
    model: nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Export ``adapter_name`` as a plain LoRA adapter.

    For each SVD layer with k kept triplets (its ``keep`` mask, else all):
    ``lora_A = A[keep]`` ``(k, in)`` and ``lora_B = B[:, keep] · E[keep]ᵀ · scaling /
    (r₀ + 1e-5)`` ``(out, k)``, so ``lora_B @ lora_A`` is the layer's ``ΔW``. Keys are relative
    to ``model``: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (Conv2d: A reshaped
    to ``(k, in, kh, kw)``, B to ``(out, k, 1, 1)``; Embedding: ``<module>.lora_embedding_A`` /
    ``<module>.lora_embedding_B``), the names of PEFT's LoRA layers under the module; a file
    in PEFT's format has its keys prefixed (``adalora_hf._serialization.to_peft_keys``).
    Returns the tensors and the rank pattern ``{module: k}``: a PEFT ``LoraConfig`` with
    ``rank_pattern`` and ``alpha_pattern`` both set to it (scaling 1) reproduces the model.
    Layers with k = 0 carry no update and are left out of both.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in iter_svd_layers(model, adapter_name):
        a, e, b = (d[adapter_name].detach() for d in (layer.lora_A, layer.lora_E, layer.lora_B))
        keep = getattr(layer, "keep", {}).get(adapter_name)
        mask = (
            torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
            if keep is None
            else torch.as_tensor(keep, dtype=torch.bool, device=a.device).reshape(-1)
        )
        if mask.numel() != a.shape[0]:
            raise ValueError(
                f"{name}.keep[{adapter_name!r}] has {mask.numel()} entries, the layer has rank "
                f"{a.shape[0]}: the mask is stale; re-run the allocation."
            )
        k = int(mask.sum())
        if k == 0:
            continue
        scale = getattr(layer, "scaling", {}).get(adapter_name, 1.0)
        new_a = a[mask].clone()  # (k, in)
        new_b = b[:, mask] * e[mask].T * scale / (layer.ranknum[adapter_name].detach() + 1e-5)
        prefix = f"{name}."
        if isinstance(layer, SVDEmbedding):
            tensors[prefix + "lora_embedding_A"] = new_a.contiguous()
            tensors[prefix + "lora_embedding_B"] = new_b.contiguous()
        else:
            if isinstance(layer, SVDConv2d):
                new_a = new_a.reshape(k, *layer.weight.shape[1:])  # (k, in, kh, kw)
                new_b = new_b.reshape(*new_b.shape, 1, 1)  # (out, k, 1, 1)
            tensors[prefix + "lora_A.weight"] = new_a.contiguous()
            tensors[prefix + "lora_B.weight"] = new_b.contiguous()
        ranks[name] = k
    return tensors, ranks
