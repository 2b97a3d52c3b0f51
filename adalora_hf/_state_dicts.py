"""PEFT's state-dict helpers for models built here: ``get_peft_model_state_dict``,
``set_peft_model_state_dict`` and ``get_base_model_state_dict``, same arguments, keys and
tensors as PEFT's (import them from ``adalora_hf`` instead of ``peft``: PEFT's own functions
recognise PEFT's layer classes only and return nothing for these models)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from adalora_torch._layers import iter_svd_layers

from ._modules_to_save import wrappers
from ._reload import live_tensors
from ._serialization import PEFT_PREFIX, TRIPLET_KINDS, file_key, triplet_key

if TYPE_CHECKING:
    from ._model import AdaLoraModel

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]


def _owner(model: nn.Module) -> tuple[AdaLoraModel, str]:
    """The ``AdaLoraModel`` and the prefix of its transformers model's keys in ``model``."""
    from ._model import AdaLoraModel

    if isinstance(model, AdaLoraModel):
        return model, "model."
    inner = getattr(model, "base_model", None)
    if isinstance(inner, AdaLoraModel):
        return inner, "base_model.model."
    raise TypeError(
        f"Expected a model from adalora_hf.get_peft_model or AdaLoraModel, got "
        f"{type(model).__name__}."
    )


def _relative(key: str, prefix: str) -> str:
    # a file key (base_model.model.<name>) as a key of the model passed
    return prefix + key.removeprefix(PEFT_PREFIX)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors as PEFT returns (and saves) them: ``lora_A``/``lora_E``/``lora_B``
    without the adapter name and shrunk by the rank pattern, the ``bias`` mode's biases and the
    ``modules_to_save`` copies. ``state_dict`` must be None (the values are read from the
    model); ``unwrap_compiled`` and ``save_embedding_layers`` are accepted for PEFT's signature
    (no embedding is adapted by default here)."""
    if state_dict is not None:
        raise ValueError(
            "state_dict= is not supported: the adapter tensors are read from the model. Call "
            "get_peft_model_state_dict(model, adapter_name=...) on the unwrapped model."
        )
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    owner, prefix = _owner(model)
    state = owner.adapter_state_dict(adapter_name)
    return {_relative(k, prefix): v for k, v in state.items()}


def _model_key(owner: AdaLoraModel, adapter_name: str) -> dict[str, str]:
    """File key -> the parameter's name in ``owner.model`` (for ``missing_keys``)."""
    out: dict[str, str] = {}
    for path, _ in iter_svd_layers(owner.model, adapter_name):
        for kind in TRIPLET_KINDS:
            out[triplet_key(path, kind)] = f"{path}.{kind}.{adapter_name}"
    for path, wrapper in wrappers(owner.model):
        if adapter_name in wrapper.modules_to_save:
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                out[file_key(f"{path}.{k}")] = f"{path}.modules_to_save.{adapter_name}.{k}"
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> Any:
    """Load tensors in ``get_peft_model_state_dict``'s form into ``adapter_name`` and return
    ``(missing_keys, unexpected_keys)`` as ``nn.Module.load_state_dict`` does: missing keys
    are the adapter's own parameters the dict lacks (base model keys are never reported).

    An inference adapter whose config has a ``rank_pattern`` is first resized by it, as PEFT.
    A tensor of another shape is a ``ValueError`` (``ignore_mismatched_sizes=True``: skipped
    with a warning). ``low_cpu_mem_usage`` is accepted and changes nothing."""
    owner, prefix = _owner(model)
    if adapter_name not in owner.peft_config:
        raise ValueError(f"No adapter {adapter_name!r}; this model has {list(owner.peft_config)}.")
    state = {PEFT_PREFIX + k.removeprefix(prefix): v for k, v in peft_model_state_dict.items()}
    cfg = owner.peft_config[adapter_name]
    if cfg.rank_pattern and adapter_name != owner.trainable_adapter_name:
        targets = live_tensors(owner.model, adapter_name)
        if any(k in state and state[k].shape != t.shape for k, t in targets.items()):
            owner.resize_modules_by_rank_pattern(cfg.rank_pattern, adapter_name)
    targets = live_tensors(owner.model, adapter_name)
    params = {file_key(n): p for n, p in owner.model.named_parameters()}
    for key in state:
        if key not in targets and key in params and key.endswith("bias"):
            targets[key] = params[key]  # the bias mode's biases
    unexpected = [_relative(k, prefix) for k in state if k not in targets]
    names = _model_key(owner, adapter_name)
    missing = [prefix + names[k] for k in targets if k not in state and k in names]
    loads = {}
    for key, dst in targets.items():
        if key not in state:
            continue
        value = state[key]
        if value.shape != dst.shape:
            if not ignore_mismatched_sizes:
                raise ValueError(
                    f"{_relative(key, prefix)} has shape {tuple(value.shape)}, the model's "
                    f"parameter {tuple(dst.shape)}: the state dict belongs to another adapter "
                    "(another init_r, rank pattern or model). Pass ignore_mismatched_sizes=True "
                    "to skip such tensors."
                )
            warnings.warn(
                f"Skipping {key}: shape {tuple(value.shape)} != {tuple(dst.shape)}.", stacklevel=2
            )
            continue
        loads[key] = (dst, value)
    with torch.no_grad():
        for dst, value in loads.values():
            dst.copy_(value.to(dst.device, dst.dtype))
    return _IncompatibleKeys(missing, unexpected)


def _base_keys(base: nn.Module) -> dict[str, str]:
    """Original key -> key in ``base`` now (``<layer>.base_layer.<p>``, wrappers'
    ``original_module``), for every state-dict entry that is not an adapter's."""
    inner = {p: "base_layer." for p, _ in iter_svd_layers(base)}
    inner.update({p: "original_module." for p, _ in wrappers(base)})
    out: dict[str, str] = {}
    for key in base.state_dict():
        owner_path = max((p for p in inner if key.startswith(p + ".")), key=len, default=None)
        original = key
        if owner_path is not None:
            rest = key[len(owner_path) + 1 :]
            if not rest.startswith(inner[owner_path]):
                continue  # an adapter's tensor
            original = f"{owner_path}.{rest[len(inner[owner_path]) :]}"
        out[original] = key
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's state dict under its original keys, adapters left out
    (``<layer>.base_layer.weight`` -> ``<layer>.weight``, ``modules_to_save`` originals)."""
    base = _owner(model)[0].model
    state = base.state_dict()
    return {original: state[key] for original, key in _base_keys(base).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> Any:
    """Load a state dict with the transformers model's original keys into the base model under
    the adapters (the inverse of ``get_base_model_state_dict``); returns ``(missing_keys,
    unexpected_keys)`` in original keys, and with ``strict`` raises ``ValueError`` on either."""
    base = _owner(model)[0].model
    keys = _base_keys(base)
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        raise ValueError(
            f"set_base_model_state_dict: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}; pass strict=False to load the matching ones."
        )
    mapped = {keys[k]: v for k, v in state_dict.items() if k in keys}
    base.load_state_dict(mapped, strict=False)
    return _IncompatibleKeys(missing, unexpected)
