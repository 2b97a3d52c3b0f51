"""Prepare a quantized transformers model for adapter training (``peft`` not needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training"]

M = TypeVar("M", bound=nn.Module)

_HALF = (torch.float16, torch.bfloat16)


def _is_quantized(model: nn.Module) -> bool:
    # transformers marks a model it loaded with a quantization_config in these attributes
    return bool(
        getattr(model, "is_quantized", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "quantization_method", None) is not None
    )


def prepare_model_for_kbit_training(
    model: M,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
) -> M:
    """Get a model loaded in 8-bit or 4-bit ready for adapter training; call it before
    ``get_peft_model``. The same preparation as ``peft.prepare_model_for_kbit_training``:

    - every parameter is frozen (the adapters added afterwards are the only trainable ones);
    - float16/bfloat16 parameters stored as plain ``nn.Parameter`` (layer norms, embeddings,
      the output head, biases) become float32, for stable training; quantized storage
      (bitsandbytes' ``Int8Params``/``Params4bit``, other tensor subclasses) is left alone;
    - on a quantized model with ``use_gradient_checkpointing=True``: gradient checkpointing is
      enabled with ``gradient_checkpointing_kwargs`` and, unless they say
      ``use_reentrant=False``, the input embeddings' output is made to require grad (the
      reentrant checkpoint backpropagates only into segments whose inputs require grad, and
      every base parameter is frozen).

    Returns ``model`` (changed in place).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if type(param) is nn.Parameter and param.dtype in _HALF:
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing and _is_quantized(model):
        kwargs.setdefault("use_reentrant", True)  # torch's default, said out loud (no warning)
        if kwargs["use_reentrant"]:
            _inputs_require_grad(model)
        _enable_checkpointing(model, kwargs)
    return model


def _inputs_require_grad(model: nn.Module) -> None:
    method = getattr(model, "enable_input_require_grads", None)
    if method is None:
        raise ValueError(
            f"{type(model).__name__} has no enable_input_require_grads; pass "
            "gradient_checkpointing_kwargs={'use_reentrant': False}."
        )
    method()


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    # transformers >= 5 names it activation checkpointing; the old name warns there
    new = getattr(model, "activation_checkpointing_enable", None)
    if new is not None:
        new(activation_checkpointing_kwargs=kwargs)
        return
    old = getattr(model, "gradient_checkpointing_enable", None)
    if old is None:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers "
            "model); pass use_gradient_checkpointing=False."
        )
    old(gradient_checkpointing_kwargs=kwargs)
