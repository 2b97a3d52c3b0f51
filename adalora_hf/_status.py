"""``get_layer_status`` / ``get_model_status``: PEFT's status reports (same dataclass fields)
for a model with AdaLoRA adapters, built from ``iter_svd_layers`` and the
``modules_to_save`` wrappers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from adalora_torch._layers import iter_svd_layers

from ._modules_to_save import wrappers

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer (or ``modules_to_save`` wrapper), PEFT's fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model, PEFT's fields; a value that differs between layers is ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _agree(values: Iterable[Any]) -> Any:
    """The one value all entries share, else ``"irregular"``."""
    distinct = {v if not isinstance(v, list) else tuple(v) for v in values}
    if len(distinct) != 1:
        return "irregular"
    value = distinct.pop()
    return list(value) if isinstance(value, tuple) else value


def _grad_state(flags: list[bool]) -> bool | Irregular:
    return True if all(flags) else False if not any(flags) else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper of ``model`` (an
    ``AdaLoraModel``, ``get_peft_model``'s result or a bare model with adapter layers), with
    PEFT's names relative to ``model``. ``ValueError`` when it has none."""
    if hasattr(model, "peft_config"):  # names as PEFT gives them: relative to the tuner model
        model = getattr(model, "base_model", model)
    out: list[TunerLayerStatus] = []
    layer: Any
    for name, layer in iter_svd_layers(model):
        grads: dict[str, list[bool]] = defaultdict(list)
        devices: dict[str, set[str]] = defaultdict(set)
        for kind in ("lora_A", "lora_E", "lora_B"):
            for adapter, param in getattr(layer, kind).items():
                grads[adapter].append(param.requires_grad)
                devices[adapter].add(param.device.type)
        for adapter, param in layer.ranknum.items():
            devices[adapter].add(param.device.type)
        out.append(
            TunerLayerStatus(
                name=name,
                module_type=type(layer).__name__,
                enabled=not layer.disable_adapters,
                active_adapters=list(layer.active_adapters),
                merged_adapters=list(layer.merged_adapters),
                requires_grad={a: _grad_state(g) for a, g in grads.items()},
                available_adapters=sorted(layer.lora_A),
                devices={a: sorted(d) for a, d in devices.items()},
                quantization_backend=None,
            )
        )
    for name, wrapper in wrappers(model):
        copies = dict(wrapper.modules_to_save.items())
        out.append(
            TunerLayerStatus(
                name=name,
                module_type=type(wrapper).__name__,
                enabled=not wrapper.disable_adapters,
                active_adapters=[wrapper.active_adapter] if wrapper.active_adapter else [],
                merged_adapters=[],
                requires_grad={
                    a: _grad_state([p.requires_grad for p in m.parameters()])
                    for a, m in copies.items()
                },
                available_adapters=sorted(copies),
                devices={
                    a: sorted({p.device.type for p in m.parameters()}) for a, m in copies.items()
                },
                quantization_backend=None,
            )
        )
    if not out:
        raise ValueError(
            "No adapter layers in this model: get_layer_status reports on a model wrapped by "
            "AdaLoraModel or get_peft_model."
        )
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter status of the whole model (``get_layer_status`` summarised, as PEFT)."""
    layers = get_layer_status(model)
    configs = getattr(model, "peft_config", None) or {}
    inner = getattr(model, "base_model", model)
    core = getattr(inner, "model", None) if configs else None
    params = list(model.parameters())
    merged_anywhere = sorted({a for s in layers for a in s.merged_adapters})
    merged: list[str] | Irregular = merged_anywhere
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & set(merged_anywhere):
            merged = "irregular"
    grads: dict[str, list[Any]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for s in layers:
        for a, g in s.requires_grad.items():
            grads[a].append(g)
        for a, d in s.devices.items():
            devices[a].update(d)
    return TunerModelStatus(
        base_model_type=type(core).__name__ if core is not None else "other",
        adapter_model_type=type(inner).__name__ if configs else "None",
        peft_types={a: str(c.peft_type) for a, c in configs.items()},
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=_agree(s.enabled for s in layers),
        active_adapters=_agree(
            s.active_adapters for s in layers if s.module_type != "ModulesToSaveWrapper"
        ),
        merged_adapters=merged,
        requires_grad={
            a: True
            if all(v is True for v in g)
            else False
            if all(v is False for v in g)
            else "irregular"
            for a, g in grads.items()
        },
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=_agree(s.quantization_backend for s in layers),
    )
