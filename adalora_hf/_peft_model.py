"""``get_peft_model`` / ``PeftModel`` for code written against PEFT: a thin wrapper whose
``base_model`` is the ``AdaLoraModel``, so parameter names are PEFT's
(``base_model.model.<path>.lora_A.default``) and ``model.base_model.update_and_allocate(step)``
works as in PEFT's documented loop."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ._config import AdaLoraConfig
from ._model import AdaLoraModel
from ._save_load import filter_missing_base_keys
from ._signature import ForwardWithSignature

__all__ = ["AdaLoraPeftModel", "get_peft_model"]

# Heads PEFT's task-specific PeftModel classes add to modules_to_save (trained and saved).
_TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


class AdaLoraPeftModel(nn.Module):
    """PEFT's ``PeftModel`` surface around an ``AdaLoraModel`` (``self.base_model``).

    Everything not defined here is looked up on ``base_model`` and then on the transformers
    model, as PEFT does.
    """

    def __init__(self, base_model: AdaLoraModel) -> None:
        super().__init__()
        self.base_model = base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def wrapped_forward(self) -> Any:
        """The transformers model's ``forward`` (its signature is reported as this one's)."""
        return self.base_model.model.forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """``base_model(*args, **kwargs)``: the model's outputs; in training mode ``loss``
        includes the orthogonal penalty only when the active config has a ``task_type``.

        This is PEFT's behaviour on each path: its task-specific ``PeftModel`` classes add the
        penalty, its plain ``PeftModel`` (no ``task_type``) calls the transformers model and
        skips it. Migrated code therefore trains the same model as under PEFT; the measured
        effect of the penalty is in ``docs/tuning.md``. ``base_model(...)`` (the
        ``AdaLoraModel``) always adds it.
        """
        base = self.base_model
        if self.active_peft_config.task_type is not None:
            return base(*args, **kwargs)
        before = base.apply_orth_penalty
        base.apply_orth_penalty = False
        try:
            return base(*args, **kwargs)
        finally:
            base.apply_orth_penalty = before

    forward = ForwardWithSignature(_forward)  # type: ignore[assignment]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The transformers model's ``generate``."""
        return self.base_model.generate(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a non-strict load of adapter entries only (a Trainer
        checkpoint) does not report the base model's keys as missing."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        owned = {"base_model." + k for k in self.base_model.adapter_state_keys()}
        return filter_missing_base_keys(result, state_dict, owned, strict)

    @property
    def peft_config(self) -> dict[str, AdaLoraConfig]:
        """Adapter name -> config (the ``AdaLoraModel``'s)."""
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        """The first active adapter."""
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> AdaLoraConfig:
        """The active adapter's config."""
        return self.base_model.peft_config[self.base_model.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The transformers model (with the adapter layers in it)."""
        return self.base_model.model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model alone."""
        with self.base_model.disable_adapter():
            yield

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``."""
        return self.base_model.get_nb_trainable_parameters()

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, as PEFT does."""
        self.base_model.print_trainable_parameters()

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """PEFT's files; keywords as ``AdaLoraModel.save_pretrained``."""
        self.base_model.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter, see ``AdaLoraModel.push_to_hub``."""
        return self.base_model.push_to_hub(repo_id, **kwargs)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> Any:
        """See ``AdaLoraModel.load_adapter`` (PEFT's keywords and result)."""
        result = self.base_model.load_adapter(model_id, adapter_name, is_trainable, **kwargs)
        if not is_trainable:
            self.eval()
        return result

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge the adapters and return the plain transformers model (PEFT's signature;
        ``progressbar`` is ignored)."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the transformers model without the adapters."""
        return self.base_model.unload()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdaLoraConfig | None = None,
        **kwargs: Any,
    ) -> AdaLoraPeftModel:
        """Load an adapter saved here or by PEFT onto ``model`` (keywords as
        ``AdaLoraModel.from_pretrained``)."""
        inner = AdaLoraModel.from_pretrained(
            model, model_id, adapter_name, is_trainable, config=config, **kwargs
        )
        wrapper = cls(inner)
        return wrapper if is_trainable else wrapper.eval()


def get_peft_model(
    model: nn.Module,
    peft_config: AdaLoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> AdaLoraPeftModel:
    """PEFT's ``get_peft_model`` for AdaLoRA: wrap ``model`` and return the ``PeftModel``-like
    wrapper (``.base_model`` is the ``AdaLoraModel``).

    As PEFT, ``task_type="SEQ_CLS"``/``"TOKEN_CLS"`` add the ``classifier``/``score`` heads and
    ``"QUESTION_ANS"`` the ``qa_outputs`` head to ``modules_to_save`` (of this model's copy of
    the config), so the head trains and is saved with the adapter; ``revision`` is recorded in
    that copy. Adapter weights are float32 (``autocast_adapter_dtype=True``) or, with
    ``autocast_adapter_dtype=False``, in a float16/bfloat16 base layer's dtype, as PEFT.
    ``low_cpu_mem_usage`` is accepted and changes nothing (the adapters are small and
    created initialised). ``mixed=True`` (PEFT's mixed adapter types) is a ``ValueError``.
    """
    if not isinstance(peft_config, AdaLoraConfig):
        raise TypeError(
            f"adalora_hf.get_peft_model takes an adalora_hf.AdaLoraConfig, got "
            f"{type(peft_config).__name__}: this library implements AdaLoRA only."
        )
    if mixed:
        raise ValueError(
            "mixed=True (PEFT's PeftMixedModel, adapters of several types) is not supported: "
            "this library implements AdaLoRA only. Leave mixed=False."
        )
    heads = _TASK_HEADS.get(peft_config.task_type or "", [])
    if heads or revision is not None:
        peft_config = copy.deepcopy(peft_config)
    if heads:
        existing = list(peft_config.modules_to_save or [])
        peft_config.modules_to_save = existing + [h for h in heads if h not in existing]
    if revision is not None:
        peft_config.revision = revision
    tuner = AdaLoraModel(model, peft_config, adapter_name)
    tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
    return AdaLoraPeftModel(tuner)


PeftModel = AdaLoraPeftModel
