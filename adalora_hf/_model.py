"""``AdaLoraModel``: AdaLoRA adapters around a transformers model, PEFT's API and file format.

Parameter names follow PEFT: the wrapped model is ``self.model`` and an adapted layer at
``<path>`` holds ``model.<path>.lora_A.<adapter>`` (``lora_E``, ``lora_B``, ``ranknum``), so
``AdaLoraModel.state_dict()`` has the keys of PEFT's ``AdaLoraModel`` and
``get_peft_model(...).state_dict()`` those of PEFT's ``PeftModel``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adalora_torch import (
    RankAllocator,
    inject_adapters,
    mark_only_adapters_trainable,
    orthogonal_penalty,
)
from adalora_torch._distributed import is_rank_zero

from . import _allocation, _save_load
from ._config import AdaLoraConfig
from ._hub import push_adapter_to_hub
from ._keywords import check_device_map, check_load_keywords, check_save_keywords
from ._modules_to_save import wrap_modules_to_save, wrappers
from ._plain_lora import PlainLoraWatch
from ._plan import Plan, plan_adapter
from ._reload import LoadResult
from ._serialization import check_adapter_name
from ._signature import ForwardWithSignature
from ._surface import PeftSurface, svd_layers

__all__ = ["AdaLoraModel"]


class AdaLoraModel(PeftSurface):
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
    # False while AdaLoraPeftModel runs a config without task_type (PEFT's plain PeftModel)
    apply_orth_penalty: bool = True
    _schedule_warned: bool = False  # AdaLoraConfig.warn_if_schedule_hurts ran (once per model)

    def __init__(
        self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self._setup(model)
        self.active_adapters = [adapter_name]
        self.add_adapter(adapter_name, config)

    def _setup(self, model: nn.Module) -> None:
        self.model = model
        self.peft_config: dict[str, AdaLoraConfig] = {}
        self.active_adapters = []
        self.trainable_adapter_name: str | None = None
        self.rankallocator: RankAllocator | None = None
        self._allocator_total_step: int | None = None
        self._adapters_disabled = False
        self._plain_lora = PlainLoraWatch()  # for the "acting as plain LoRA" warning
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
    def _hf_peft_config_loaded(self) -> bool:
        # transformers' flag for "trainable adapters are attached": its Trainer refuses a
        # quantized base model without it
        return self.trainable_adapter_name is not None

    @property
    def active_adapter(self) -> str:
        """The first active adapter."""
        return self.active_adapters[0]

    # -- building -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        """Add a second (third, ...) adapter; it is not made active (see ``set_adapter``).

        Only one adapter can train: a config without ``inference_mode=True`` while another
        adapter trains is a ``ValueError``. Every check runs before the model changes.
        """
        trainable = self.trainable_adapter_name
        plan = plan_adapter(
            self.model, adapter_name, config, existing=self.peft_config, trainable=trainable
        )
        self._apply_plan(plan)

    def _apply_plan(self, plan: Plan) -> None:
        """Make the changes ``plan_adapter`` validated (nothing here is expected to fail)."""
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
            init_weights=bool(cfg.init_lora_weights),  # "loftq": see loftq_bits
            rank_pattern={p.name: p.rank for p in plan.adapters if p.rank != cfg.init_r},
            activate=adapter_name in self.active_adapters,
            loftq_bits=plan.loftq[0] if plan.loftq else None,
            loftq_iter=plan.loftq[1] if plan.loftq else 1,
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
            for _, layer in svd_layers(self.model, adapter_name):
                for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                    d[adapter_name].requires_grad_(False)
        wrap_modules_to_save(
            self.model,
            adapter_name,
            plan.save_modules,
            trainable=not cfg.inference_mode,
            activate=adapter_name in self.active_adapters,
        )
        if not cfg.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = _allocation.build_allocator(self.model, cfg, adapter_name)
            self._allocator_total_step = cfg.total_step

    # -- adapters -----------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list of names) the active adapter(s). As PEFT, their
        weights get ``requires_grad = not inference_mode`` and every other adapter's is
        frozen; the rank allocator stays with ``trainable_adapter_name``."""
        self._activate(adapter_name)
        self._set_grads(set(self.active_adapters), not inference_mode, False)

    def _activate(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(
                f"Unknown adapters {unknown or names}; this model has {list(self.peft_config)}."
            )
        self.active_adapters = names
        for _, layer in svd_layers(self.model):
            layer.set_adapter([a for a in names if a in layer.lora_A])
        for _, wrapper in wrappers(self.model):
            wrapper.set_adapter(next((a for a in names if a in wrapper.modules_to_save), None))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (and its allocator if it is the trainable one).
        A merged adapter is refused (``unmerge`` first), as PEFT."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name} does not exist; this model has {list(self.peft_config)}."
            )
        if any(adapter_name in layer.merged_adapters for _, layer in svd_layers(self.model)):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please "
                "unmerge them first."
            )
        for _, layer in svd_layers(self.model, adapter_name):
            layer.delete_adapter(adapter_name)
        for _, wrapper in wrappers(self.model):
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self._activate(remaining)
        else:
            self.active_adapters = []

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model alone (merged adapters are unmerged). As in
        PEFT 0.21, the adapters' parameters (and ``modules_to_save`` copies) are frozen inside
        and get their ``requires_grad`` back on exit."""
        layers = [m for _, m in svd_layers(self.model)] + [m for _, m in wrappers(self.model)]
        params = [p for _, p in self._adapter_parameters()]
        before = [layer.disable_adapters for layer in layers]
        grads_before = [p.requires_grad for p in params]
        disabled_before = self._adapters_disabled
        try:
            for layer in layers:
                layer.disable_adapters = True
            for p in params:
                p.requires_grad_(False)
            self._adapters_disabled = True
            yield
        finally:
            for layer, flag in zip(layers, before):
                layer.disable_adapters = flag
            for p, flag in zip(params, grads_before):
                p.requires_grad_(flag)
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
        self._plain_lora.training_forward(self.model, name)
        weight = self.peft_config[name].orth_reg_weight
        if weight > 0 and self.apply_orth_penalty and not self._adapters_disabled:
            penalty = orthogonal_penalty(self.model, adapter_name=name)
            outputs.loss = (loss + weight * penalty.to(loss.device)).to(loss.dtype)
        return outputs

    forward = ForwardWithSignature(_forward)  # type: ignore[assignment]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` (language models), adapters active."""
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    # -- rank allocation ----------------------------------------------------------------------
    def _trainable(self) -> str:
        return _allocation.trainable_name(self)

    def set_total_step(self, total_step: int) -> None:
        """Set ``total_step`` of the trainable adapter (what ``AdaLoraCallback`` does)."""
        _allocation.set_total_step(self, total_step)

    def update_and_allocate(self, global_step: int) -> int:
        """Update the importance scores, reallocate the rank budget, mask E.

        Call it once per optimizer step, after ``optimizer.step()`` and before
        ``optimizer.zero_grad()`` (the gradients are read; the class docstring shows the loop).

        ``tinit``, ``tfinal`` and ``deltaT`` are handled here (see ``AdaLoraConfig``); steps
        must increase. Each allocation records ``peft_config[adapter].rank_pattern`` in PEFT's
        form, ``{"<module>.lora_E.<adapter>": [bool, ...]}``. Returns the budget (number of
        triplets allowed) at this step.

        Raises ``ValueError``, changing nothing, when ``total_step`` is unset, when the step
        does not increase (a second call for one step, a step going backwards), or when an
        importance update is due and no adapter parameter has a gradient (called before
        ``backward()`` or after ``zero_grad()``: the allocator's rule, docs/allocator.md). A
        step whose gradients are not finite (an fp16 overflow that ``GradScaler`` skips) leaves
        the importance as it was and is counted in ``rankallocator.skipped_steps``.
        """
        return _allocation.update_and_allocate(self, global_step)

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The trainable (else the active) adapter's recorded pattern, PEFT's form; None before
        the first allocation."""
        name = self.trainable_adapter_name or self.active_adapter
        return self.peft_config[name].rank_pattern

    def total_rank(self, adapter_name: str | None = None) -> int:
        """Triplets kept now over all matrices of an adapter (default: the trainable one, else
        the active one): the sum of its rank pattern, or of its layers' ranks before one."""
        return _allocation.total_rank(self, adapter_name)

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
        return _save_load.adapter_state_keys(self)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.state_dict`` (PEFT's keys); while ``adapter_only_state_dict`` is set
        (``AdaLoraCallback`` sets it while the Trainer writes a checkpoint) only the adapter
        entries, so checkpoints are small and tied weights never reach safetensors twice."""
        out = super().state_dict(*args, **kwargs)
        if self.adapter_only_state_dict:
            _save_load.drop_base_entries(self, out, kwargs.get("prefix", ""))
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a non-strict load of adapter entries only (a Trainer
        checkpoint) does not report the base model's keys as missing."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        owned = self.adapter_state_keys()
        return _save_load.filter_missing_base_keys(result, state_dict, owned, strict)

    def save_allocator_state(self, directory: str | os.PathLike[str]) -> None:
        """Write the rank allocator's state (importance EMAs, step, pattern) into
        ``directory``, without pickle, so a resumed run allocates as an uninterrupted one."""
        _allocation.save_state(self, directory)

    def load_allocator_state(self, directory: str | os.PathLike[str]) -> bool:
        """Restore what ``save_allocator_state`` wrote; False when ``directory`` has none."""
        return _allocation.load_state(self, directory)

    # -- saving and loading (PEFT's files: see _save_load and _serialization) ------------------
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors PEFT saves for an adapter, under PEFT's file keys, shrunk by its rank
        pattern (triplets, the ``bias`` mode's biases, the ``modules_to_save`` copies)."""
        return _save_load.adapter_state_dict(self, adapter_name)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's files and signature: ``adapter_config.json`` (``inference_mode=True``),
        ``adapter_model.safetensors`` (``.bin`` if not ``safe_serialization``) shrunk by the
        rank pattern, ``README.md``; ``"default"`` in ``save_directory``, others in
        ``save_directory/<name>``. Crash-safe; keywords not honoured raise ``ValueError``."""
        check_save_keywords(save_embedding_layers, path_initial_model_for_weight_conversion, kwargs)
        if not (is_main_process and is_rank_zero()):  # under torch.distributed: rank 0 writes
            return
        _save_load.save_adapters(
            self, os.fspath(save_directory), selected_adapters, safe_serialization
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload ``save_pretrained``'s files (never the base model) to ``repo_id`` (``_hub``)."""
        return push_adapter_to_hub(self, repo_id, **kwargs)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Load an adapter saved here or by PEFT (``.bin`` with ``weights_only=True``); PEFT's
        signature and result. A name the model has gets its weights replaced, as PEFT. All is
        checked before the model changes; unsupported keywords raise (``_keywords``)."""
        check_adapter_name(adapter_name)
        config = kwargs.pop("config", None)
        check_load_keywords(ephemeral_gpu_offload, key_mapping, kwargs)
        check_device_map(kwargs.get("device_map"), self.model)
        result = _save_load.load_adapter(self, model_id, adapter_name, is_trainable, config)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)  # as get_peft_model
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdaLoraConfig | None = None,
        **kwargs: Any,
    ) -> AdaLoraModel:
        """Wrap ``model`` with the adapter saved at ``model_id`` (a local directory), frozen
        in eval mode unless ``is_trainable``; ``config`` replaces the saved one."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(model)
        self.active_adapters = [adapter_name]
        self.load_adapter(model_id, adapter_name, is_trainable, config=config, **kwargs)
        return self
