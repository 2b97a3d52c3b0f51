"""Saving and loading ``AdaLoraModel`` adapters: PEFT's files and adapter-only state dicts.

``save_adapters`` writes what ``save_pretrained`` promises (tensors shrunk by the rank pattern,
the config with ``inference_mode=True``), ``prepare_load`` reads and checks an adapter directory
before the model changes, ``load_weights`` copies the tensors in once the plan is applied.
File and key names come from ``_serialization`` (``file_key``, ``triplet_key``, ...), the one
module that knows PEFT's format (docs/design.md).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adalora_torch._layers import iter_svd_layers

from ._config import AdaLoraConfig
from ._io import write_file_atomic, write_files_atomic
from ._model_card import model_card_bytes
from ._modules_to_save import wrappers
from ._plan import Plan, bias_params, inside, plan_adapter
from ._reload import LoadResult, live_tensors, reload_weights
from ._serialization import (
    CONFIG_NAME,
    PEFT_PREFIX,
    PICKLE_NAME,
    README_NAME,
    TRIPLET_KINDS,
    WEIGHTS_NAME,
    check_config_stamp,
    file_key,
    module_masks,
    pattern_key,
    pickle_bytes,
    read_weights,
    shrink_state_dict,
    triplet_key,
    weights_bytes,
)

if TYPE_CHECKING:
    from ._model import AdaLoraModel

__all__ = [
    "adapter_state_dict",
    "adapter_state_keys",
    "drop_base_entries",
    "filter_missing_base_keys",
    "load_adapter",
    "load_weights",
    "prepare_load",
    "save_adapters",
]

logger = logging.getLogger(__name__)

# ModulesToSaveWrapper's children: PEFT's bias modes save biases found under them too
_WRAPPER_PARTS = ("original_module", "modules_to_save")


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


# -- state dicts (Trainer checkpoints) --------------------------------------------------------
def adapter_state_keys(owner: AdaLoraModel) -> set[str]:
    """Keys of ``owner.state_dict()`` that belong to the adapters rather than the base model
    (see ``AdaLoraModel.adapter_state_keys``)."""
    keys: set[str] = set()
    for path, layer in iter_svd_layers(owner.model):
        for kind in (*TRIPLET_KINDS, "ranknum"):
            keys.update(f"model.{path}.{kind}.{name}" for name in getattr(layer, kind))
    for path, wrapper in wrappers(owner.model):
        for name, copy_ in wrapper.modules_to_save.items():
            keys.update(f"model.{path}.modules_to_save.{name}.{k}" for k in copy_.state_dict())
    keys.update(n for n, p in owner.named_parameters() if p.requires_grad)
    return keys


def drop_base_entries(owner: AdaLoraModel, state: dict[str, Any], prefix: str) -> None:
    """Remove from ``state`` (``owner.state_dict(prefix=prefix)``) the base model's entries."""
    keep = {prefix + k for k in adapter_state_keys(owner)}
    for key in [k for k in state if k.startswith(prefix) and k not in keep]:
        del state[key]


def filter_missing_base_keys(result: Any, state_dict: Any, owned: set[str], strict: bool) -> Any:
    """Drop base-model keys from ``result.missing_keys`` when a non-strict load got adapter
    entries only (``owned``: the adapter keys of the module loaded into)."""
    if strict or not state_dict or not set(state_dict) <= owned:
        return result
    missing = [k for k in result.missing_keys if k in owned]
    return type(result)(missing, result.unexpected_keys)


# -- saving -----------------------------------------------------------------------------------
def adapter_state_dict(owner: AdaLoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for an adapter, under PEFT's file keys, shrunk by its rank
    pattern (see ``AdaLoraModel.adapter_state_dict``)."""
    if adapter_name not in owner.peft_config:
        raise ValueError(f"No adapter {adapter_name!r}; this model has {list(owner.peft_config)}.")
    model = owner.model
    cfg = owner.peft_config[adapter_name]
    state: dict[str, torch.Tensor] = {}
    wrapper_paths = [n for n, _ in wrappers(model)]
    for path, layer in iter_svd_layers(model, adapter_name):
        for kind in TRIPLET_KINDS:
            state[triplet_key(path, kind)] = getattr(layer, kind)[adapter_name].detach()
        bias = getattr(layer.base_layer, "bias", None)
        if cfg.bias == "lora_only" and isinstance(bias, torch.Tensor):
            state[file_key(f"{path}.base_layer.bias")] = bias.detach()
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if _is_bias(pname) and not inside(pname, wrapper_paths):
                state[file_key(pname)] = p.detach()
    for path, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[file_key(f"{path}.{k}")] = v.detach()
    return shrink_state_dict(state, module_masks(cfg.rank_pattern, adapter_name))


def _config_to_save(owner: AdaLoraModel, adapter_name: str) -> AdaLoraConfig:
    cfg = copy.deepcopy(owner.peft_config[adapter_name])
    masks = module_masks(cfg.rank_pattern, adapter_name)
    cfg.rank_pattern = {pattern_key(m): v for m, v in masks.items()} if masks else None
    cfg.inference_mode = True
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = owner.model.__dict__.get("name_or_path") or None
    if cfg.task_type is None:
        cls = type(owner.model)
        cfg.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return cfg


def save_adapters(
    owner: AdaLoraModel,
    save_directory: str,
    selected_adapters: list[str] | None,
    safe_serialization: bool = True,
) -> None:
    """Write PEFT's files for each selected adapter and the model card (see
    ``AdaLoraModel.save_pretrained``): everything is checked and serialised before the first
    byte is written."""
    names = list(owner.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in owner.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters names unknown adapters {unknown}; this model has "
            f"{list(owner.peft_config)}."
        )
    names.sort(key=lambda n: n != "default")  # the top directory first
    outs = [save_directory if n == "default" else os.path.join(save_directory, n) for n in names]
    for out in [save_directory, *outs]:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{out!r} is a file; pass a directory to save the adapter into.")
    weights_name, stale = (WEIGHTS_NAME, PICKLE_NAME)
    if not safe_serialization:
        weights_name, stale = stale, weights_name
    contents: list[dict[str, bytes]] = []
    for name in names:
        cfg = _config_to_save(owner, name)
        if cfg.total_step is None:
            logger.warning(
                "Saving adapter %r with total_step=None: peft.PeftModel.from_pretrained "
                "refuses AdaLoRA configs without total_step (adalora loads them).",
                name,
            )
        state = adapter_state_dict(owner, name)
        blob = weights_bytes(state, cfg.to_dict()) if safe_serialization else pickle_bytes(state)
        contents.append({weights_name: blob, CONFIG_NAME: cfg.to_json_bytes()})
    card = model_card_bytes(save_directory, owner.model.__dict__.get("name_or_path") or None)
    if card is not None and outs[0] == save_directory:
        contents[0][README_NAME] = card  # one set with the default adapter's files
    for out, files in zip(outs, contents):
        write_files_atomic(out, files)
        old = os.path.join(out, stale)
        if os.path.isfile(old):  # the loader prefers safetensors: drop the other format
            os.remove(old)
    if card is not None and outs[0] != save_directory:
        write_file_atomic(os.path.join(save_directory, README_NAME), card)


# -- loading ----------------------------------------------------------------------------------
def _pattern_ranks(
    plan: Plan, masks: Mapping[str, list[bool]], weights: Mapping[str, torch.Tensor], where: str
) -> dict[str, int]:
    """Module -> rank for the modules whose saved tensors are shrunk by ``masks``; raises
    ``ValueError`` for a pattern that names a module not adapted or does not fit ``init_r``."""
    planned = {p.name: p for p in plan.adapters}
    ranks: dict[str, int] = {}
    for module, mask in masks.items():
        p = planned.get(module)
        if p is None:
            raise ValueError(
                f"{where}: rank_pattern names {module!r}, which this config does not adapt in "
                f"this model (adapted: {list(planned)[:4]}...): the pattern belongs to another "
                f"model or target_modules. Fix rank_pattern or target_modules in {CONFIG_NAME}."
            )
        if len(mask) != p.rank:
            raise ValueError(
                f"{where}: rank_pattern[{pattern_key(module)!r}] has {len(mask)} entries, but "
                f"init_r is {p.rank}: the pattern does not fit (one bool per triplet of the "
                f"adapter at creation). Fix rank_pattern or init_r in {CONFIG_NAME}."
            )
        a = weights.get(triplet_key(module, "lora_A"))
        if a is not None and a.dim() == 2 and a.shape[0] == sum(mask) != len(mask):
            ranks[module] = sum(mask)
    return ranks


def _adapter_dir(model_id: str | os.PathLike[str]) -> str:
    path = os.fspath(model_id)
    if os.path.isfile(path):
        raise ValueError(
            f"{path!r} is a file: pass the adapter's directory (the one holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    return path


def prepare_load(
    owner: AdaLoraModel,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool,
    config: AdaLoraConfig | None = None,
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Read the adapter directory ``model_id`` and check everything against ``owner`` (see
    ``AdaLoraModel.load_adapter``), touching nothing: the plan to apply and the tensors.
    ``config``: used instead of the directory's ``adapter_config.json`` (PEFT's
    ``from_pretrained(..., config=...)``)."""
    path = _adapter_dir(model_id)
    given = config is not None
    config = copy.deepcopy(config) if given else AdaLoraConfig.from_pretrained(path)
    assert config is not None
    config.inference_mode = not is_trainable
    weights, metadata = read_weights(path)
    if not given:  # a config the caller passes replaces the saved one: the tensors are checked
        check_config_stamp(metadata, config.to_dict(), path)
    masks = module_masks(config.rank_pattern, adapter_name)

    def plan(ranks: Mapping[str, int] | None = None) -> Plan:
        return plan_adapter(
            owner.model,
            adapter_name,
            config,
            existing=owner.peft_config,
            trainable=owner.trainable_adapter_name,
            ranks=ranks,
            source=path,
        )

    planned = plan()
    ranks = _pattern_ranks(planned, masks, weights, path)
    if ranks:
        planned = plan(ranks)
    _check_weights(owner.model, planned, weights, masks, path)
    return planned, weights


def _check_weights(
    model: nn.Module,
    plan: Plan,
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, list[bool]],
    where: str,
) -> None:
    """Every tensor of the file against what ``plan`` creates: keys, shapes, dtypes, finite
    values. Raises ``ValueError`` saying what does not fit."""
    init_r = plan.cfg.init_r
    saved_for = plan.cfg.base_model_name_or_path
    origin = f" (it was saved for {saved_for!r})" if saved_for else ""
    required: dict[str, tuple[int, ...]] = {}
    lora_rank: dict[str, str] = {}
    for p in plan.adapters:
        shapes = ((p.rank, p.a_cols), (p.rank, 1), (p.b_rows, p.rank))
        for kind, shape in zip(TRIPLET_KINDS, shapes):
            key = triplet_key(p.name, kind)
            required[key] = shape
            mask = masks.get(p.name)
            shrunk = mask is not None and sum(mask) != init_r
            lora_rank[key] = f"rank init_r={init_r}" + (
                f", or {sum(mask or [])} as kept by rank_pattern" if shrunk else ""
            )
    existing = dict(wrappers(model))
    for name in plan.save_modules:
        module = existing[name].original_module if name in existing else None
        module = module or model.get_submodule(name)
        for k, v in module.state_dict().items():
            required[file_key(f"{name}.{k}")] = tuple(v.shape)
    optional = {file_key(k): v for k, v in bias_params(model, plan).items()}
    missing = [k for k in required if k not in weights]
    extra = [k for k in weights if k not in required and k not in optional]
    if plan.cfg.bias != "none":  # PEFT's bias modes also save the wrappers' insides
        inner = [file_key(f"{n}.{p}.") for n in plan.save_modules for p in _WRAPPER_PARTS]
        extra = [k for k in extra if not k.startswith(tuple(inner))]
    hint = ""
    if extra and not any(k.startswith(PEFT_PREFIX) for k in extra):
        hint = f" (in PEFT's format every key starts with {PEFT_PREFIX!r})"
    if missing:
        also = f"; it has {len(extra)} tensors this model has no place for{hint}" if extra else ""
        raise ValueError(
            f"{where}: the adapter file lacks {len(missing)} tensors of adapter "
            f"{plan.adapter_name!r}, e.g. {missing[:3]}{also}: it was saved for another "
            f"base model or target_modules{origin}. Load it onto the model it was trained on."
        )
    if extra:
        raise ValueError(
            f"{where}: the adapter file has {len(extra)} tensors that {CONFIG_NAME} "
            f"does not account for, e.g. {extra[:3]}{hint}: the file and the config do not "
            f"belong together, or the adapter was saved for another base model{origin}. "
            "Save the adapter again."
        )
    for key, value in weights.items():
        expected = required.get(key, optional.get(key))
        if expected is None:
            continue  # ignored (see above)
        if tuple(value.shape) != expected:
            rank = f" ({lora_rank[key]})" if key in lora_rank else ""
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} in the file, this model needs "
                f"{expected}{rank}: the adapter belongs to another base model, init_r or "
                f"rank_pattern{origin}."
            )
        if not value.dtype.is_floating_point:
            raise ValueError(
                f"{where}: {key} has dtype {value.dtype} in the file; adapter tensors are "
                "floating point: the file is not an adapter saved by PEFT or adalora."
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{where}: {key} holds NaN or inf: the adapter diverged or the file is "
                "corrupted; load a checkpoint from before the divergence."
            )


def load_weights(model: nn.Module, plan: Plan, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy the checked tensors of the file into the adapter ``plan`` created in ``model``."""
    targets = live_tensors(model, plan.adapter_name)
    params = {file_key(n): p for n, p in model.named_parameters()}
    for key in weights:
        if key not in targets:  # a bias of the bias mode (checked by _check_weights)
            param = params.get(key)
            if param is not None:  # else PEFT's copy of a wrapper's inside: not loaded
                targets[key] = param
    with torch.no_grad():
        for key, dst in targets.items():
            value = weights[key]
            dst.copy_(value.to(dst.device, dst.dtype))


def load_adapter(
    owner: AdaLoraModel,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool,
    config: AdaLoraConfig | None,
) -> LoadResult:
    """``AdaLoraModel.load_adapter`` once the keywords are checked: a new adapter is planned,
    checked, created and filled; an existing one gets its weights replaced (``_reload``)."""
    if adapter_name in owner.peft_config:
        return reload_weights(owner, model_id, adapter_name)
    plan, weights = prepare_load(owner, model_id, adapter_name, is_trainable, config)
    owner._apply_plan(plan)
    load_weights(owner.model, plan, weights)
    if not is_trainable:
        owner.eval()
    return LoadResult([], [])
