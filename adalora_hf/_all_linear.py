"""``target_modules="all-linear"``: PEFT's shorthand for every linear layer (``nn.Linear`` and
transformers' ``Conv1D``) of the model except its output head, resolved to module names."""

from __future__ import annotations

from torch import nn

from adalora_torch._layers import is_conv1d, iter_svd_layers

__all__ = ["all_linear_names"]

_SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's names of classification heads


def _head_name(model: nn.Module, task_type: str | None) -> str | None:
    """The output head PEFT leaves out: the output embedding of a transformers model, else
    (sequence classification) its ``score``/``classifier`` attribute."""
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is None or not hasattr(model, "config"):
        return None  # not a transformers model: PEFT excludes nothing
    head = get_output()
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in _SEQ_CLS_HEADS if hasattr(model, n)), None)
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def all_linear_names(model: nn.Module, task_type: str | None = None) -> list[str]:
    """Names of the linear layers ``"all-linear"`` adapts in ``model`` (sorted): every
    ``nn.Linear``/``Conv1D`` and every existing adapter layer around one, not the insides of
    adapter layers, not the output head. ``ValueError`` when there is none."""
    adapted = {n: layer for n, layer in iter_svd_layers(model)}
    names = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in adapted):
            continue  # inside an adapter layer (its base layer, its dropout)
        base = getattr(adapted.get(name), "base_layer", module)
        if isinstance(base, nn.Linear) or is_conv1d(base):
            names.add(name)
    names.discard(_head_name(model, task_type) or "")
    if not names:
        raise ValueError(
            'target_modules="all-linear" found no linear layer (nn.Linear or Conv1D) besides '
            "the output head: name the modules to adapt in target_modules."
        )
    return sorted(names)
