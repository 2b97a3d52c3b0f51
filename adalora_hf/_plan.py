"""Which modules an adapter adapts and copies: target matching and the validated plan.

``plan_adapter`` checks everything about adding an adapter (its name, its config, the target
and ``modules_to_save`` names against the model, the rank schedule) and says what would change,
touching nothing; ``AdaLoraModel`` then applies the plan. Names are matched by the one matcher,
``adalora_torch._inject.name_matches``, and adapter layers are found by
``adalora_torch._layers.iter_svd_layers``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from adalora_core import validate_schedule
from adalora_torch import SVDAdapter
from adalora_torch._bnb import bnb_layer_class
from adalora_torch._inject import PlannedAdapter, check_loftq_targets, name_matches, plan_adapters
from adalora_torch._layers import iter_svd_layers

from ._all_linear import all_linear_names
from ._config import ALL_LINEAR, AdaLoraConfig
from ._loftq_config import check_loftq_config
from ._modules_to_save import wrappers
from ._serialization import check_adapter_name
from ._targets import default_target_modules

__all__ = ["Plan", "bias_params", "inside", "plan_adapter"]


def inside(name: str, prefixes: Sequence[str]) -> bool:
    """Whether ``name`` is one of the module paths ``prefixes`` or lies under one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class Plan:
    """What adding an adapter changes, validated before anything changes (``plan_adapter``)."""

    adapter_name: str
    cfg: AdaLoraConfig  # the model's copy, target_modules resolved
    exact: str  # full-match regex of the target names
    adapters: list[PlannedAdapter]  # the SVD adapters to create, with their shapes
    save_modules: list[str]  # the modules_to_save modules (wrapped or to wrap)
    loftq: tuple[int, int] | None = None  # (bits, iterations) when LoftQ initialises the targets


def _check_same_loftq_base(
    cfg: AdaLoraConfig, existing: Mapping[str, AdaLoraConfig], source: str
) -> None:
    """A LoftQ adapter loaded onto layers that another LoftQ adapter quantized pairs with their
    base only if both were made with the same settings (the quantized weight depends on them)."""
    for name, other in existing.items():
        if other.init_lora_weights != "loftq":
            continue
        if (other.loftq_config, other.init_r) != (cfg.loftq_config, cfg.init_r):
            raise ValueError(
                f"The LoftQ adapter in {source} was made with loftq_config={cfg.loftq_config} "
                f"and init_r={cfg.init_r}, but this model's base was quantized by adapter "
                f"{name!r} with loftq_config={other.loftq_config} and init_r={other.init_r}: "
                "its triplets pair with another quantized weight. Load it onto a fresh "
                "full-precision model instead."
            )


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n][:12]


def _target_names(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    targets = config.target_modules
    assert targets is not None
    skip = [n for n, _ in wrappers(model)]
    if config.modules_to_save:
        skip += [
            n for n, _ in model.named_modules() if n and name_matches(n, config.modules_to_save)
        ]
    svd = [n for n, _ in iter_svd_layers(model)]
    names = []
    for name, _ in model.named_modules():
        if not name or inside(name, skip):
            continue
        if any(name.startswith(p + ".") for p in svd):
            continue  # the insides of an adapter layer
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if name_matches(name, targets):
            names.append(name)
    return names


def _modules_to_save(model: nn.Module, cfg: AdaLoraConfig) -> list[str]:
    """The modules ``cfg.modules_to_save`` copies (existing wrappers or modules to wrap)."""
    if not cfg.modules_to_save:
        return []
    wrapped = [n for n, _ in wrappers(model)]
    svd = [n for n, _ in iter_svd_layers(model)]
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if not name or not name_matches(name, cfg.modules_to_save):
            continue
        within = inside(name, wrapped) or inside(name, svd) or inside(name, chosen)
        if name in wrapped or not within:  # an existing wrapper, or a module to wrap
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"modules_to_save={cfg.modules_to_save!r} names no module of the model (entries "
            "match a module name or its last components, outside adapted layers): fix the "
            "names (e.g. 'classifier', 'score') or leave modules_to_save None. Some module "
            f"names: {_module_names(model)}."
        )
    return chosen


def plan_adapter(
    model: nn.Module,
    adapter_name: str,
    config: AdaLoraConfig,
    *,
    existing: Mapping[str, AdaLoraConfig],
    trainable: str | None,
    ranks: Mapping[str, int] | None = None,
    source: str | None = None,
) -> Plan:
    """Validate adding ``adapter_name`` with ``config`` to ``model`` and say what would change,
    touching nothing. Raises ``ValueError`` (``TypeError`` for a config of another class)
    saying what to change.

    ``existing``: the adapters the model has (name -> config); ``trainable``: the one that
    trains, if any. ``ranks``: module -> rank to create (a shrunk adapter being loaded); others
    get ``init_r``, and every one keeps ``ranknum = init_r``. ``source``: the directory an
    adapter is loaded from (named in the error when no module matches).
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(
            f"config must be an adalora_hf.AdaLoraConfig, got {type(config).__name__}; "
            "this library implements AdaLoRA only."
        )
    check_adapter_name(adapter_name)
    if adapter_name in existing:
        raise ValueError(
            f"Adapter {adapter_name!r} already exists; pick another name or delete_adapter "
            "it first."
        )
    if not config.inference_mode and trainable is not None:
        raise ValueError(
            f"AdaLoraModel supports only 1 trainable adapter and {trainable!r} trains: add "
            f"{adapter_name!r} with inference_mode=True, or delete_adapter {trainable!r} first."
        )
    config.validate()
    cfg = copy.deepcopy(config)
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        cfg.target_modules = default_target_modules(model_type)
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == ALL_LINEAR:
        cfg.target_modules = all_linear_names(model, cfg.task_type)
    names = _target_names(model, cfg)
    if not names:
        loading = ""
        if source is not None:
            saved_for = (
                f", saved for {cfg.base_model_name_or_path!r}"
                if cfg.base_model_name_or_path
                else ""
            )
            loading = (
                f" The adapter at {source!r}{saved_for} belongs to another architecture: load "
                "it onto the model it was trained on."
            )
        raise ValueError(
            f"No module matches target_modules={cfg.target_modules!r}"
            + (f" outside exclude_modules={cfg.exclude_modules!r}" if cfg.exclude_modules else "")
            + ": list entries match a "
            "module name or its last components, a string is a full-match regex. Some "
            f"module names: {_module_names(model)}.{loading}"
        )
    exact = "|".join(re.escape(n) for n in names)
    adapters = plan_adapters(
        model,
        exact,
        adapter_name=adapter_name,
        rank=cfg.init_r,
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
        rank_pattern=ranks,
    )
    plan = Plan(adapter_name, cfg, exact, adapters, _modules_to_save(model, cfg))
    if cfg.init_lora_weights == "loftq":
        loftq = check_loftq_config(cfg.init_lora_weights, cfg.loftq_config)  # the stored dict
        bits, iterations = loftq["loftq_bits"], loftq["loftq_iter"]
        # loading onto the quantized base it was trained on: the file's triplets replace the
        # initialisation; onto the full-precision base, LoftQ recomputes the same quantized base
        quantized = [bnb_layer_class(getattr(p.module, "base_layer", p.module)) for p in adapters]
        if source is None or not all(quantized):
            check_loftq_targets(adapters, bits, iterations)
            plan.loftq = (bits, iterations)
        else:
            _check_same_loftq_base(cfg, existing, source)
    if not cfg.inference_mode:
        # what RankAllocator checks, before the model changes
        init_budget, target_budget = sum(p.rank for p in adapters), cfg.target_r * len(adapters)
        if ranks and target_budget > init_budget:
            raise ValueError(
                f"target_r={cfg.target_r} asks for {target_budget} triplets over "
                f"{len(adapters)} matrices, but the adapter's rank_pattern keeps only "
                f"{init_budget}: set target_r to at most {init_budget // len(adapters)} in "
                "its config to keep training it, or load it with is_trainable=False."
            )
        validate_schedule(
            init_budget=init_budget,
            target_budget=target_budget,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            total_step=cfg.total_step or cfg.tinit + cfg.tfinal + 1,
            deltaT=cfg.deltaT,
        )
    return plan


def bias_params(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Names (and shapes) of the biases the ``bias`` mode saves, named as they will be once
    ``plan`` is applied (a new adapter layer puts its base under ``base_layer``)."""
    mode = plan.cfg.bias
    if mode == "none":
        return {}
    new = {p.name for p in plan.adapters if not isinstance(p.module, SVDAdapter)}
    adapted = {p.name for p in plan.adapters}
    wrapped = [n for n, _ in wrappers(model)] + plan.save_modules
    out: dict[str, tuple[int, ...]] = {}
    for pname, param in model.named_parameters():
        if not (pname == "bias" or pname.endswith(".bias")) or inside(pname, wrapped):
            continue
        owner = pname.rpartition(".")[0]
        if owner in new:
            owner += ".base_layer"
        layer = owner.removesuffix(".base_layer") if owner.endswith(".base_layer") else None
        if mode == "lora_only" and layer not in adapted:
            continue
        out[f"{owner}.bias"] = tuple(param.shape)
    return out
