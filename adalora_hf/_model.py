"""``AdaLoraModel``: AdaLoRA adapters around a transformers model, PEFT's API and file format.

Parameter names follow PEFT: the wrapped model is ``self.model`` and an adapted layer at
``<path>`` holds ``model.<path>.lora_A.<adapter>`` (``lora_E``, ``lora_B``, ``ranknum``), so
``AdaLoraModel.state_dict()`` has the keys of PEFT's ``AdaLoraModel`` and
``get_peft_model(...).state_dict()`` those of PEFT's ``PeftModel``.
"""

from __future__ import annotations

import copy
import logging
import operator
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adalora_core import validate_schedule
from adalora_torch import (
    RankAllocator,
    SVDAdapter,
    inject_adapters,
    mark_only_adapters_trainable,
    orthogonal_penalty,
)
from adalora_torch._distributed import is_rank_zero
from adalora_torch._inject import PlannedAdapter, name_matches, plan_adapters

from ._checkpoint import load_allocator_state, save_allocator_state
from ._config import AdaLoraConfig
from ._io import write_files_atomic
from ._modules_to_save import ModulesToSaveWrapper
from ._serialization import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    check_config_stamp,
    module_masks,
    pattern_key,
    read_weights,
    shrink_state_dict,
    weights_bytes,
)
from ._signature import ForwardWithSignature
from ._targets import default_target_modules

__all__ = ["AdaLoraModel"]

logger = logging.getLogger(__name__)

# ModulesToSaveWrapper's children: PEFT's bias modes save biases found under them too
_WRAPPER_PARTS = ("original_module", "modules_to_save")

# Forward calls (training mode, with a loss) after which a run that never calls
# update_and_allocate is told that AdaLoRA is acting as plain LoRA.
_PLAIN_LORA_FORWARDS = 10


def _inside(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class _Plan:
    """What adding an adapter changes, validated before anything changes (``_plan``)."""

    adapter_name: str
    cfg: AdaLoraConfig  # this model's copy, target_modules resolved
    exact: str  # full-match regex of the target names
    adapters: list[PlannedAdapter]  # the SVD adapters to create, with their shapes
    save_modules: list[str]  # the modules_to_save modules (wrapped or to wrap)


def _pattern_ranks(
    plan: _Plan, masks: Mapping[str, list[bool]], weights: Mapping[str, torch.Tensor], where: str
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
        a = weights.get(f"{PEFT_PREFIX}{module}.lora_A")
        if a is not None and a.dim() == 2 and a.shape[0] == sum(mask) != len(mask):
            ranks[module] = sum(mask)
    return ranks


def filter_missing_base_keys(result: Any, state_dict: Any, owned: set[str], strict: bool) -> Any:
    """Drop base-model keys from ``result.missing_keys`` when a non-strict load got adapter
    entries only (``owned``: the adapter keys of the module loaded into)."""
    if strict or not state_dict or not set(state_dict) <= owned:
        return result
    missing = [k for k in result.missing_keys if k in owned]
    return type(result)(missing, result.unexpected_keys)


class AdaLoraModel(nn.Module):
    """AdaLoRA (adaptive LoRA) on a transformers model: PEFT's ``AdaLoraModel``, validated.

    ``AdaLoraModel(model, config, adapter_name="default")`` replaces the ``target_modules`` of
    ``model`` in place by SVD adapter layers of rank ``config.init_r`` (defaults per model type
    when ``target_modules`` is None), freezes everything but the adapter (and the ``bias`` mode's
    biases and the ``modules_to_save`` copies), and, unless ``config.inference_mode``, builds the
    rank allocator. One adapter trains; more can be added with ``inference_mode=True``.

    Training loop (the documented one; ``base_model`` is this object)::

        loss = model(**batch).loss          # + orth_reg_weight * orthogonal penalty
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(i_step)
        optimizer.zero_grad()

    With ``transformers.Trainer``, add ``AdaLoraCallback()`` instead of calling
    ``update_and_allocate``. Attributes: ``model`` (the wrapped model), ``peft_config``
    (adapter name -> this model's copy of its config; the allocator records
    ``rank_pattern`` there), ``rankallocator`` (the ``adalora_torch.RankAllocator``, or None).
    """

    active_adapters: list[str]

    def __init__(
        self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self._setup(model)
        self.active_adapters = [adapter_name]
        self._apply_plan(self._plan(adapter_name, config))

    def _setup(self, model: nn.Module) -> None:
        self.model = model
        self.peft_config: dict[str, AdaLoraConfig] = {}
        self.active_adapters = []
        self.trainable_adapter_name: str | None = None
        self.rankallocator: RankAllocator | None = None
        self._allocator_total_step: int | None = None
        self._adapters_disabled = False
        # for the "acting as plain LoRA" warning
        self._allocate_calls = 0
        self._train_forwards = 0
        self._param_snapshot: torch.Tensor | None = None
        self._optimizer_steps_seen = 0
        self._warned_plain_lora = False
        # set by AdaLoraCallback while the Trainer writes a checkpoint (see state_dict)
        self.adapter_only_state_dict = False

    # -- attribute forwarding (as PEFT) -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> AdaLoraModel:
        """This model, so that ``model.base_model.update_and_allocate(step)`` works as in PEFT's
        documented loop whether ``model`` is an ``AdaLoraModel`` or ``get_peft_model``'s result."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the adapter layers in it)."""
        return self.model

    def wrapped_forward(self) -> Any:
        """The wrapped model's ``forward`` (its signature is reported as this one's)."""
        return self.model.forward

    @property
    def active_adapter(self) -> str:
        """The first active adapter."""
        return self.active_adapters[0]

    # -- building -----------------------------------------------------------------------------
    def _svd_layers(self, adapter_name: str | None = None) -> list[tuple[str, Any]]:
        # the adalora_torch layers (SVDLinear, ...), typed loosely: they carry more than the
        # SVDAdapter protocol (set_adapter, merge, disable_adapters, ...)
        return [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, SVDAdapter) and (adapter_name is None or adapter_name in m.lora_A)
        ]

    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [
            (n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)
        ]

    def _target_names(self, config: AdaLoraConfig) -> list[str]:
        targets = config.target_modules
        assert targets is not None
        skip = [n for n, _ in self._wrappers()]
        skip += [
            n
            for n, _ in self.model.named_modules()
            if n and config.modules_to_save and name_matches(n, config.modules_to_save)
        ]
        svd = [n for n, _ in self._svd_layers()]
        names = []
        for name, _ in self.model.named_modules():
            if not name or _inside(name, skip):
                continue
            if any(name.startswith(p + ".") for p in svd):
                continue  # the insides of an adapter layer
            if name_matches(name, targets):
                names.append(name)
        return names

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        """Add a second (third, ...) adapter; it is not made active (see ``set_adapter``).

        Only one adapter can train: a config without ``inference_mode=True`` while another
        adapter trains is a ``ValueError``. Every check runs before the model changes.
        """
        self._apply_plan(self._plan(adapter_name, config))

    def _plan(
        self,
        adapter_name: str,
        config: AdaLoraConfig,
        ranks: Mapping[str, int] | None = None,
        source: str | None = None,
    ) -> _Plan:
        """Validate adding ``adapter_name`` and say what would change, touching nothing.

        ``ranks``: module -> rank to create (a shrunk adapter being loaded); others get
        ``init_r``, and every one keeps ``ranknum = init_r``. ``source``: the directory an
        adapter is loaded from (named in the error when no module matches).
        """
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(
                f"config must be an adalora_hf.AdaLoraConfig, got {type(config).__name__}; "
                "this library implements AdaLoRA only."
            )
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"adapter_name must be a non-empty string without '.', got {adapter_name!r} "
                "(it becomes part of parameter names such as lora_A.<adapter_name>)."
            )
        if adapter_name in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name!r} already exists; pick another name or delete_adapter "
                "it first."
            )
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(
                f"AdaLoraModel trains one adapter and {self.trainable_adapter_name!r} already "
                f"trains: add {adapter_name!r} with inference_mode=True, or delete_adapter "
                f"{self.trainable_adapter_name!r} first."
            )
        config.validate()
        cfg = copy.deepcopy(config)
        if cfg.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            cfg.target_modules = default_target_modules(model_type)
        names = self._target_names(cfg)
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
                f"No module matches target_modules={cfg.target_modules!r}: list entries match a "
                "module name or its last components, a string is a full-match regex. Some "
                f"module names: {[n for n, _ in self.model.named_modules() if n][:12]}.{loading}"
            )
        exact = "|".join(re.escape(n) for n in names)
        adapters = plan_adapters(
            self.model,
            exact,
            adapter_name=adapter_name,
            rank=cfg.init_r,
            layers_to_transform=cfg.layers_to_transform,
            layers_pattern=cfg.layers_pattern,
            rank_pattern=ranks,
        )
        plan = _Plan(adapter_name, cfg, exact, adapters, self._plan_modules_to_save(cfg))
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

    def _plan_modules_to_save(self, cfg: AdaLoraConfig) -> list[str]:
        """The modules ``cfg.modules_to_save`` copies (existing wrappers or modules to wrap)."""
        if not cfg.modules_to_save:
            return []
        wrappers = [n for n, _ in self._wrappers()]
        svd = [n for n, _ in self._svd_layers()]
        chosen: list[str] = []
        for name, _ in self.model.named_modules():
            if not name or not name_matches(name, cfg.modules_to_save):
                continue
            inside = _inside(name, wrappers) or _inside(name, svd) or _inside(name, chosen)
            if name in wrappers or not inside:  # an existing wrapper, or a module to wrap
                chosen.append(name)
        if not chosen:
            raise ValueError(
                f"modules_to_save={cfg.modules_to_save!r} names no module of the model (entries "
                "match a module name or its last components, outside adapted layers): fix the "
                "names (e.g. 'classifier', 'score') or leave modules_to_save None. Some module "
                f"names: {[n for n, _ in self.model.named_modules() if n][:12]}."
            )
        return chosen

    def _apply_plan(self, plan: _Plan) -> None:
        """Make the changes ``_plan`` validated (nothing here is expected to fail)."""
        adapter_name, cfg = plan.adapter_name, plan.cfg
        adapted = inject_adapters(
            self.model,
            plan.exact,
            adapter_name=adapter_name,
            rank=cfg.init_r,
            alpha=float(cfg.lora_alpha),
            dropout=float(cfg.lora_dropout),
            fan_in_fan_out=cfg.fan_in_fan_out,
            layers_to_transform=cfg.layers_to_transform,
            layers_pattern=cfg.layers_pattern,
            init_weights=bool(cfg.init_lora_weights),
            rank_pattern={p.name: p.rank for p in plan.adapters if p.rank != cfg.init_r},
            activate=adapter_name in self.active_adapters,
        )
        self.peft_config[adapter_name] = cfg
        if any(getattr(self.model.get_submodule(n), "fan_in_fan_out", False) for n in adapted):
            cfg.fan_in_fan_out = True  # transformers' Conv1D (GPT-2), recorded as PEFT does
        if not cfg.inference_mode:
            # freezes everything else: the base model and any inference-only adapter
            mark_only_adapters_trainable(self.model, adapter_name, cfg.bias)
        elif self.trainable_adapter_name is None:
            self.model.requires_grad_(False)  # nothing trains
        else:
            for _, layer in self._svd_layers(adapter_name):
                for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                    d[adapter_name].requires_grad_(False)
        self._wrap_modules_to_save(adapter_name, cfg, plan.save_modules)
        if not cfg.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(
                self.model,
                target_r=cfg.target_r,
                tinit=cfg.tinit,
                tfinal=cfg.tfinal,
                total_step=cfg.total_step,
                deltaT=cfg.deltaT,
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                adapter_name=adapter_name,
            )
            self._allocator_total_step = cfg.total_step

    def _wrap_modules_to_save(
        self, adapter_name: str, cfg: AdaLoraConfig, names: list[str]
    ) -> None:
        trainable = not cfg.inference_mode
        wrappers = dict(self._wrappers())
        for name in names:
            wrapper = wrappers.get(name)
            if wrapper is None:
                parent, _, child = name.rpartition(".")
                wrapper = ModulesToSaveWrapper(self.model.get_submodule(name))
                setattr(self.model.get_submodule(parent), child, wrapper)
            wrapper.add_adapter(adapter_name, trainable)
            if adapter_name in self.active_adapters:
                wrapper.set_adapter(adapter_name)

    # -- adapters -----------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or a list of names) the active adapter(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(
                f"Unknown adapters {unknown or names}; this model has {list(self.peft_config)}."
            )
        self.active_adapters = names
        for _, layer in self._svd_layers():
            layer.set_adapter([a for a in names if a in layer.lora_A])
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(next((a for a in names if a in wrapper.modules_to_save), None))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (and its allocator if it is the trainable one)."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter {adapter_name!r}; this model has {list(self.peft_config)}."
            )
        for _, layer in self._svd_layers(adapter_name):
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model alone (merged adapters are unmerged)."""
        layers = [m for _, m in self._svd_layers()] + [m for _, m in self._wrappers()]
        before = [layer.disable_adapters for layer in layers]
        disabled_before = self._adapters_disabled
        try:
            for layer in layers:
                layer.disable_adapters = True
            self._adapters_disabled = True
            yield
        finally:
            for layer, flag in zip(layers, before):
                layer.disable_adapters = flag
            self._adapters_disabled = disabled_before

    # -- forward ------------------------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model; in training mode add ``orth_reg_weight * penalty`` to
        ``outputs.loss`` when it is a tensor (the orthogonality of the trainable A and B)."""
        outputs = self.model(*args, **kwargs)
        name = self.trainable_adapter_name
        loss = getattr(outputs, "loss", None)
        if name is None or not self.training or not isinstance(loss, torch.Tensor):
            return outputs
        self._note_training_forward()
        weight = self.peft_config[name].orth_reg_weight
        if weight > 0 and not self._adapters_disabled:
            penalty = orthogonal_penalty(self.model, adapter_name=name)
            outputs.loss = (loss + weight * penalty.to(loss.device)).to(loss.dtype)
        return outputs

    forward = ForwardWithSignature(_forward)  # type: ignore[assignment]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` (language models), adapters active."""
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def _note_training_forward(self) -> None:
        # Optimizer steps are seen as a change of one small trainable tensor between forward
        # passes (version counters miss fused optimizers), so gradient accumulation does not
        # trigger the warning. Checks stop at the first update_and_allocate call.
        if self._allocate_calls or self._warned_plain_lora:
            return
        self._train_forwards += 1
        name = self.trainable_adapter_name
        layers = self._svd_layers(name)
        if layers and name is not None:
            current = layers[0][1].lora_A[name].detach()
            before = self._param_snapshot
            if (
                before is not None
                and before.device == current.device
                and not torch.equal(current, before)
            ):
                self._optimizer_steps_seen += 1
            self._param_snapshot = current.clone()
        if self._train_forwards >= _PLAIN_LORA_FORWARDS and self._optimizer_steps_seen >= 1:
            self._warned_plain_lora = True
            warnings.warn(
                f"AdaLoRA is acting as plain LoRA: {self._train_forwards} training forward "
                "passes and no call of update_and_allocate, so no rank is ever reallocated. "
                "Call model.base_model.update_and_allocate(step) after optimizer.step() (before "
                "zero_grad()), or add adalora_hf.AdaLoraCallback() to the Trainer's callbacks.",
                UserWarning,
                stacklevel=4,
            )

    # -- rank allocation ----------------------------------------------------------------------
    def _trainable(self) -> str:
        if self.trainable_adapter_name is None or self.rankallocator is None:
            raise ValueError(
                "This model has no trainable adapter (all adapters have inference_mode=True): "
                "load it with is_trainable=True or add an adapter with inference_mode=False."
            )
        return self.trainable_adapter_name

    def set_total_step(self, total_step: int) -> None:
        """Set ``total_step`` of the trainable adapter (what ``AdaLoraCallback`` does)."""
        name = self._trainable()
        cfg = self.peft_config[name]
        old = cfg.total_step
        cfg.total_step = total_step
        try:
            cfg.check_schedule()
        except ValueError:
            cfg.total_step = old
            raise
        self._sync_total_step(cfg)

    def _sync_total_step(self, cfg: AdaLoraConfig) -> None:
        assert self.rankallocator is not None and cfg.total_step is not None
        if cfg.total_step != self._allocator_total_step:
            self.rankallocator.set_total_step(cfg.total_step)
            self._allocator_total_step = cfg.total_step

    def update_and_allocate(self, global_step: int) -> int:
        """Update the importance scores, reallocate the rank budget, mask E.

        Call it once per optimizer step, after ``optimizer.step()`` and before
        ``optimizer.zero_grad()`` (the gradients are read)::

            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(i_step)
            optimizer.zero_grad()

        ``tinit``, ``tfinal`` and ``deltaT`` are handled here (see ``AdaLoraConfig``); steps
        must increase. Each allocation records ``peft_config[adapter].rank_pattern`` in PEFT's
        form, ``{"<module>.lora_E.<adapter>": [bool, ...]}``. Returns the budget (number of
        triplets allowed) at this step.

        Raises ``ValueError``, changing nothing, when ``total_step`` is unset, when the step
        does not increase (a second call for one step, a step going backwards), or when an
        importance update is due and no adapter parameter has a gradient (called before
        ``backward()`` or after ``zero_grad()``). A step whose gradients are not finite (an
        fp16 overflow that ``GradScaler`` skips) leaves the importance as it was and is counted
        in ``rankallocator.skipped_steps``.
        """
        name = self._trainable()
        cfg = self.peft_config[name]
        cfg.check_schedule(require_total_step=True)
        self._sync_total_step(cfg)
        allocator = self.rankallocator
        assert allocator is not None and cfg.total_step is not None
        try:
            step = operator.index(global_step)
        except TypeError:
            step = None  # the allocator explains
        if (
            step is not None
            and allocator.step < step < cfg.total_step - cfg.tfinal
            and not allocator.finalized
            and not self._has_gradient(name)
        ):
            raise ValueError(
                f"update_and_allocate({global_step}) found no gradient on any parameter of "
                f"adapter {name!r}: call it after loss.backward() and optimizer.step(), before "
                "optimizer.zero_grad() (which removes the gradients it reads). Nothing changed."
            )
        budget, pattern = allocator.update_and_allocate(global_step)
        self._allocate_calls += 1
        if pattern is None and cfg.rank_pattern is None:
            pattern = allocator.rank_pattern  # restored by rankallocator.load_state_dict
        if pattern is not None:
            cfg.rank_pattern = {pattern_key(m, name): list(mask) for m, mask in pattern.items()}
        return budget

    def _has_gradient(self, adapter_name: str) -> bool:
        # lazy: stops at the first adapter parameter with a gradient (normally in layer 0)
        for m in self.model.modules():
            if "lora_A" not in m._modules or not isinstance(m, SVDAdapter):
                continue
            if adapter_name in m.lora_A and any(
                d[adapter_name].grad is not None for d in (m.lora_A, m.lora_E, m.lora_B)
            ):
                return True
        return False

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The trainable (else the active) adapter's recorded pattern, PEFT's form; None before
        the first allocation."""
        name = self.trainable_adapter_name or self.active_adapter
        return self.peft_config[name].rank_pattern

    def total_rank(self, adapter_name: str | None = None) -> int:
        """Triplets kept now over all matrices of an adapter (default: the trainable one, else
        the active one): the sum of its rank pattern, or of its layers' ranks before one."""
        name = adapter_name or self.trainable_adapter_name or self.active_adapter
        masks = module_masks(self.peft_config[name].rank_pattern, name)
        total = 0
        for path, layer in self._svd_layers(name):
            rank = int(layer.lora_E[name].shape[0])
            mask = masks.get(path)
            total += sum(mask) if mask is not None and len(mask) == rank else rank
        return total

    # -- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' ``ΔW`` (default: the active ones) into the base weights."""
        for _, layer in self._svd_layers():
            names = self.active_adapters if adapter_names is None else adapter_names
            layer.merge(
                safe_merge=safe_merge, adapter_names=[n for n in names if n in layer.lora_A]
            )

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for _, layer in self._svd_layers():
            layer.unmerge()

    merge_adapter = merge
    unmerge_adapter = unmerge

    def _unload(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None) -> nn.Module:
        if merge:
            self.merge(adapter_names=adapter_names, safe_merge=safe_merge)
        for path, layer in self._svd_layers():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.base_layer)
        for path, wrapper in self._wrappers():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, wrapper.current())
        return self.model

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain transformers model
        (``modules_to_save`` replaced by the trained copies). ``progressbar`` is accepted for
        PEFT's signature and ignored."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model without the adapters (unmerged, adapters discarded)."""
        self.unmerge()
        return self._unload(False, False, None)

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- state dicts and checkpoints ----------------------------------------------------------
    def adapter_state_keys(self) -> set[str]:
        """Keys of ``state_dict()`` that belong to the adapters rather than the base model:
        every adapter's ``lora_A``/``lora_E``/``lora_B``/``ranknum``, the ``modules_to_save``
        copies and any other trainable parameter (the ``bias`` mode's biases)."""
        keys: set[str] = set()
        for path, layer in self._svd_layers():
            for kind in ("lora_A", "lora_E", "lora_B", "ranknum"):
                keys.update(f"model.{path}.{kind}.{name}" for name in getattr(layer, kind))
        for path, wrapper in self._wrappers():
            for name, copy_ in wrapper.modules_to_save.items():
                keys.update(f"model.{path}.modules_to_save.{name}.{k}" for k in copy_.state_dict())
        keys.update(n for n, p in self.named_parameters() if p.requires_grad)
        return keys

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.state_dict`` (PEFT's keys); while ``adapter_only_state_dict`` is set
        (``AdaLoraCallback`` sets it while the Trainer writes a checkpoint) only the adapter
        entries, so checkpoints are small and tied weights never reach safetensors twice."""
        out = super().state_dict(*args, **kwargs)
        if self.adapter_only_state_dict:
            prefix = kwargs.get("prefix", "")
            keep = {prefix + k for k in self.adapter_state_keys()}
            for key in [k for k in out if k.startswith(prefix) and k not in keep]:
                del out[key]
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a non-strict load of adapter entries only (a Trainer
        checkpoint) does not report the base model's keys as missing."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        return filter_missing_base_keys(result, state_dict, self.adapter_state_keys(), strict)

    def save_allocator_state(self, directory: str | os.PathLike[str]) -> None:
        """Write the rank allocator's state (importance EMAs, step, pattern) into
        ``directory``, without pickle, so a resumed run allocates as an uninterrupted one."""
        self._trainable()
        assert self.rankallocator is not None
        save_allocator_state(self.rankallocator, os.fspath(directory))

    def load_allocator_state(self, directory: str | os.PathLike[str]) -> bool:
        """Restore what ``save_allocator_state`` wrote; False when ``directory`` has none."""
        name = self._trainable()
        assert self.rankallocator is not None
        cfg = self.peft_config[name]
        if cfg.total_step is not None:
            self._sync_total_step(cfg)
        if not load_allocator_state(self.rankallocator, os.fspath(directory)):
            return False
        total_step = self.rankallocator.total_step
        if cfg.total_step is None and total_step is not None:
            cfg.total_step = self._allocator_total_step = total_step
        pattern = self.rankallocator.rank_pattern
        if pattern is not None:
            cfg.rank_pattern = {pattern_key(m, name): list(v) for m, v in pattern.items()}
        self._allocate_calls += 1
        return True

    # -- saving and loading -------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors PEFT saves for an adapter, under PEFT's file keys, shrunk by its
        rank pattern: ``base_model.model.<path>.lora_A|lora_E|lora_B``, the ``bias`` mode's
        biases and the ``modules_to_save`` copies (``base_model.model.<module>.<param>``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter {adapter_name!r}; this model has {list(self.peft_config)}."
            )
        cfg = self.peft_config[adapter_name]
        state: dict[str, torch.Tensor] = {}
        wrapper_paths = [n for n, _ in self._wrappers()]
        for path, layer in self._svd_layers(adapter_name):
            for kind in ("lora_A", "lora_E", "lora_B"):
                state[f"{PEFT_PREFIX}{path}.{kind}"] = getattr(layer, kind)[adapter_name].detach()
            bias = getattr(layer.base_layer, "bias", None)
            if cfg.bias == "lora_only" and isinstance(bias, torch.Tensor):
                state[f"{PEFT_PREFIX}{path}.base_layer.bias"] = bias.detach()
        if cfg.bias == "all":
            for pname, p in self.model.named_parameters():
                if (pname == "bias" or pname.endswith(".bias")) and not _inside(
                    pname, wrapper_paths
                ):
                    state[f"{PEFT_PREFIX}{pname}"] = p.detach()
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                    state[f"{PEFT_PREFIX}{path}.{k}"] = v.detach()
        return shrink_state_dict(state, module_masks(cfg.rank_pattern, adapter_name))

    def _config_to_save(self, adapter_name: str) -> AdaLoraConfig:
        cfg = copy.deepcopy(self.peft_config[adapter_name])
        masks = module_masks(cfg.rank_pattern, adapter_name)
        cfg.rank_pattern = {pattern_key(m): v for m, v in masks.items()} if masks else None
        cfg.inference_mode = True
        if cfg.base_model_name_or_path is None:
            cfg.base_model_name_or_path = self.model.__dict__.get("name_or_path") or None
        if cfg.task_type is None:
            cls = type(self.model)
            cfg.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        return cfg

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
    ) -> None:
        """Write PEFT's files: ``adapter_config.json`` and ``adapter_model.safetensors``.

        The ``"default"`` adapter goes into ``save_directory``, any other adapter into
        ``save_directory/<name>`` (as PEFT). Tensors are shrunk by the rank pattern and the
        config is written with ``inference_mode=True``, so ``peft.PeftModel.from_pretrained``
        and ``AdaLoraModel.from_pretrained`` both load the result.

        Crash-safe: a directory holding only a previous adapter is replaced as a whole (the new
        files are written next to it and swapped in); in a directory with other files each
        adapter file is replaced atomically, and a pair from two saves is refused at load
        (docs/errors.md, "Saving"). Unknown ``selected_adapters`` or a path that is a file
        raise ``ValueError`` before anything is written.
        """
        if not (is_main_process and is_rank_zero()):  # under torch.distributed: rank 0 writes
            return
        save_directory = os.fspath(save_directory)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters names unknown adapters {unknown}; this model has "
                f"{list(self.peft_config)}."
            )
        names.sort(key=lambda n: n != "default")  # the top directory first
        outs = [
            save_directory if n == "default" else os.path.join(save_directory, n) for n in names
        ]
        for out in outs:
            if os.path.exists(out) and not os.path.isdir(out):
                raise ValueError(f"{out!r} is a file; pass a directory to save the adapter into.")
        contents: list[dict[str, bytes]] = []
        for name in names:  # everything serialised before the first byte is written
            cfg = self._config_to_save(name)
            if cfg.total_step is None:
                logger.warning(
                    "Saving adapter %r with total_step=None: peft.PeftModel.from_pretrained "
                    "refuses AdaLoRA configs without total_step (adalora loads them).",
                    name,
                )
            blob = weights_bytes(self.adapter_state_dict(name), cfg.to_dict())
            contents.append({WEIGHTS_NAME: blob, CONFIG_NAME: cfg.to_json_bytes()})
        for out, files in zip(outs, contents):
            write_files_atomic(out, files)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
    ) -> None:
        """Load an adapter saved by ``save_pretrained`` here or by PEFT (safetensors only).

        A shrunk adapter (a ``rank_pattern`` in its config) gets per-module ranks from the
        pattern and keeps ``ranknum = init_r``, so its outputs are the saved model's.

        Everything is checked before the model changes: the files (present, readable, from one
        save), the config, the rank pattern against the adapted modules, and every tensor of
        the file (no key missing or extra, shapes, dtypes, finite values). On any error the
        model is exactly as before (docs/errors.md lists the errors).
        """
        path = os.fspath(model_id)
        if os.path.isfile(path):
            raise ValueError(
                f"{path!r} is a file: pass the adapter's directory (the one holding "
                f"{CONFIG_NAME} and {WEIGHTS_NAME})."
            )
        config = AdaLoraConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        weights, metadata = read_weights(path)
        check_config_stamp(metadata, config.to_dict(), path)
        masks = module_masks(config.rank_pattern, adapter_name)
        plan = self._plan(adapter_name, config, source=path)
        ranks = _pattern_ranks(plan, masks, weights, path)
        if ranks:
            plan = self._plan(adapter_name, config, ranks, source=path)
        self._check_weights(plan, weights, masks, path)
        self._apply_plan(plan)
        self._load_weights(plan, weights)
        if not is_trainable:
            self.eval()

    def _bias_keys(self, plan: _Plan) -> dict[str, tuple[int, ...]]:
        """File keys (and shapes) of the biases the ``bias`` mode saves, named as they will be
        once ``plan`` is applied (a new adapter layer puts its base under ``base_layer``)."""
        mode = plan.cfg.bias
        if mode == "none":
            return {}
        new = {p.name for p in plan.adapters if not isinstance(p.module, SVDAdapter)}
        adapted = {p.name for p in plan.adapters}
        wrapped = [n for n, _ in self._wrappers()] + plan.save_modules
        out: dict[str, tuple[int, ...]] = {}
        for pname, param in self.model.named_parameters():
            if not (pname == "bias" or pname.endswith(".bias")) or _inside(pname, wrapped):
                continue
            owner = pname.rpartition(".")[0]
            if owner in new:
                owner += ".base_layer"
            layer = owner.removesuffix(".base_layer") if owner.endswith(".base_layer") else None
            if mode == "lora_only" and layer not in adapted:
                continue
            out[f"{PEFT_PREFIX}{owner}.bias"] = tuple(param.shape)
        return out

    def _check_weights(
        self,
        plan: _Plan,
        weights: Mapping[str, torch.Tensor],
        masks: Mapping[str, list[bool]],
        where: str,
    ) -> None:
        """Every tensor of the file against what ``plan`` creates: keys, shapes, dtypes,
        finite values. Raises ``ValueError`` saying what does not fit."""
        init_r = plan.cfg.init_r
        saved_for = plan.cfg.base_model_name_or_path
        origin = f" (it was saved for {saved_for!r})" if saved_for else ""
        required: dict[str, tuple[int, ...]] = {}
        lora_rank: dict[str, str] = {}
        for p in plan.adapters:
            for kind, shape in (
                ("lora_A", (p.rank, p.a_cols)),
                ("lora_E", (p.rank, 1)),
                ("lora_B", (p.b_rows, p.rank)),
            ):
                key = f"{PEFT_PREFIX}{p.name}.{kind}"
                required[key] = shape
                mask = masks.get(p.name)
                shrunk = mask is not None and sum(mask) != init_r
                lora_rank[key] = f"rank init_r={init_r}" + (
                    f", or {sum(mask or [])} as kept by rank_pattern" if shrunk else ""
                )
        wrappers = dict(self._wrappers())
        for name in plan.save_modules:
            module = wrappers[name].original_module if name in wrappers else None
            module = module or self.model.get_submodule(name)
            for k, v in module.state_dict().items():
                required[f"{PEFT_PREFIX}{name}.{k}"] = tuple(v.shape)
        optional = self._bias_keys(plan)
        missing = [k for k in required if k not in weights]
        extra = [k for k in weights if k not in required and k not in optional]
        if plan.cfg.bias != "none":  # PEFT's bias modes also save the wrappers' insides
            inner = [f"{PEFT_PREFIX}{n}.{p}." for n in plan.save_modules for p in _WRAPPER_PARTS]
            extra = [k for k in extra if not k.startswith(tuple(inner))]
        hint = ""
        if extra and not any(k.startswith(PEFT_PREFIX) for k in extra):
            hint = f" (in PEFT's format every key starts with {PEFT_PREFIX!r})"
        if missing:
            also = (
                f"; it has {len(extra)} tensors this model has no place for{hint}" if extra else ""
            )
            raise ValueError(
                f"{where}: the adapter file lacks {len(missing)} tensors of adapter "
                f"{plan.adapter_name!r}, e.g. {missing[:3]}{also}: it was saved for another "
                f"base model or target_modules{origin}. Load it onto the model it was trained on."
            )
        if extra:
            raise ValueError(
                f"{where}: the adapter file has {len(extra)} tensors that adapter_config.json "
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

    def _load_weights(self, plan: _Plan, weights: Mapping[str, torch.Tensor]) -> None:
        adapter_name = plan.adapter_name
        targets: dict[str, torch.Tensor] = {}
        for path, layer in self._svd_layers(adapter_name):
            for kind in ("lora_A", "lora_E", "lora_B"):
                targets[f"{PEFT_PREFIX}{path}.{kind}"] = getattr(layer, kind)[adapter_name]
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                for k, v in (
                    wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items()
                ):
                    targets[f"{PEFT_PREFIX}{path}.{k}"] = v
        params = dict(self.model.named_parameters())
        for key in weights:
            if key not in targets:  # a bias of the bias mode (checked by _check_weights)
                param = params.get(key[len(PEFT_PREFIX) :])
                if param is not None:  # else PEFT's copy of a wrapper's inside: not loaded
                    targets[key] = param
        with torch.no_grad():
            for key, dst in targets.items():
                value = weights[key]
                dst.copy_(value.to(dst.device, dst.dtype))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdaLoraModel:
        """Wrap ``model`` with the adapter saved at ``model_id`` (a local directory).

        ``is_trainable=False`` (the default, as PEFT) loads it frozen in eval mode.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(model)
        self.active_adapters = [adapter_name]
        self.load_adapter(model_id, adapter_name, is_trainable=is_trainable)
        return self
