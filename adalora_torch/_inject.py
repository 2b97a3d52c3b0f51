"""Put SVD adapter layers into any ``nn.Module``, and choose what trains."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from ._layers import SVDConv2d, SVDEmbedding, SVDLinear, _SVDLayerBase, is_conv1d, iter_svd_layers

__all__ = ["inject_adapters", "mark_only_adapters_trainable"]

_SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Conv2d (groups=1) and nn.Embedding"


def _name_matches(name: str, targets: Sequence[str] | str) -> bool:
    # str: full-match regex; list: exact name or ".<target>" suffix (PEFT's semantics)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The integer component right after a layers_pattern component (first one wins).

    Without a pattern, the first integer component that is not the module's own name
    (``model.layers.3.mlp.up`` -> 3), as PEFT does.
    """
    parts = name.split(".")
    if layers_pattern is None or len(layers_pattern) == 0:
        for i, p in enumerate(parts[:-1]):
            if i > 0 and p.isdigit():
                return int(p)
        return None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        for i in range(len(parts) - 2):
            if parts[i] == pattern and parts[i + 1].isdigit():
                return int(parts[i + 1])
    return None


def _wrap(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    adapter_name: str,
    fan_in_fan_out: bool,
    init_weights: bool,
) -> nn.Module | None:
    args = (rank, alpha, dropout)
    name, init = adapter_name, init_weights
    if isinstance(module, nn.Linear) or is_conv1d(module):
        fifo = fan_in_fan_out or is_conv1d(module)
        return SVDLinear(module, *args, adapter_name=name, fan_in_fan_out=fifo, init_weights=init)
    if isinstance(module, nn.Conv2d):
        return SVDConv2d(module, *args, adapter_name=name, init_weights=init)
    if isinstance(module, nn.Embedding):
        return SVDEmbedding(module, *args, adapter_name=name, init_weights=init)
    return None


def inject_adapters(
    model: nn.Module,
    targets: Sequence[str] | str,
    *,
    adapter_name: str = "default",
    rank: int = 12,
    alpha: float = 8.0,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    init_weights: bool = True,
    rank_pattern: Mapping[str, int] | None = None,
) -> list[str]:
    """Replace the target submodules of ``model`` in place by SVD adapter layers.

    ``targets``: a string is a regex that must match the whole module name
    (``re.fullmatch``); a list matches a module whose name equals an entry or ends with
    ``"." + entry`` (PEFT's semantics). ``layers_to_transform`` keeps only modules whose layer
    index (the integer after a ``layers_pattern`` component such as ``"layers"``, or, without a
    pattern, the first integer component of the name) is in it. ``rank_pattern`` maps module
    names (same matching as a list target) to the rank to create them with (used to load a
    shrunk adapter); others get ``rank``. A module that already is an SVD layer gets a new
    adapter ``adapter_name`` (``add_adapter``). Base parameters keep their ``requires_grad``;
    see ``mark_only_adapters_trainable``.

    Returns the adapted module names as in ``model.named_modules()``. Raises ``ValueError``
    when nothing matches or a matched module has an unsupported type.

    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> inject_adapters(m, ["0", "2"], rank=2)
    ['0', '2']
    """
    layer_filter: set[int] | None
    if layers_to_transform is None:
        layer_filter = None
    elif isinstance(layers_to_transform, int):
        layer_filter = {layers_to_transform}
    else:
        layer_filter = set(layers_to_transform)

    modules = list(model.named_modules())
    svd_prefixes = [n + "." for n, _ in iter_svd_layers(model)]
    adapted: list[str] = []
    for name, module in modules:
        if not name or any(name.startswith(p) for p in svd_prefixes):
            continue  # the root, or the insides of an existing adapter layer
        if not _name_matches(name, targets):
            continue
        if layer_filter is not None and _layer_index(name, layers_pattern) not in layer_filter:
            continue
        r = rank
        if rank_pattern:
            for key, value in rank_pattern.items():
                if name == key or name.endswith("." + key):
                    r = int(value)
        if isinstance(module, _SVDLayerBase):
            module.add_adapter(adapter_name, r, alpha, dropout, init_weights)
        else:
            new = _wrap(module, r, alpha, dropout, adapter_name, fan_in_fan_out, init_weights)
            if new is None:
                raise ValueError(
                    f"Module {name!r} matches the targets but is a {type(module).__name__}; "
                    f"supported types are {_SUPPORTED}. Narrow the targets to those layers."
                )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        adapted.append(name)

    if not adapted:
        names = [n for n, _ in modules if n][:12]
        extra = (
            f" with layers_to_transform={layers_to_transform!r}, layers_pattern={layers_pattern!r}"
            if layer_filter is not None
            else ""
        )
        raise ValueError(
            f"No module of the model matches targets={targets!r}{extra}. Change the targets "
            f"(list entries match a name or its last components; a string is a full-match "
            f"regex). Some module names: {names}."
        )
    return adapted


def mark_only_adapters_trainable(
    model: nn.Module, adapter_name: str = "default", bias: str = "none"
) -> None:
    """Freeze every parameter except ``lora_A``/``lora_E``/``lora_B`` of ``adapter_name``.

    ``bias``: ``"none"`` keeps all biases frozen, ``"all"`` trains every parameter named
    ``bias``, ``"lora_only"`` trains the biases of the adapted base layers (PEFT's modes).
    ``ranknum`` always stays frozen.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
    for p in model.parameters():
        p.requires_grad_(False)
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    for _, m in iter_svd_layers(model):
        if adapter_name in m.lora_A:
            for d in (m.lora_A, m.lora_E, m.lora_B):
                d[adapter_name].requires_grad_(True)
            base_bias = getattr(m.base_layer, "bias", None)
            if bias == "lora_only" and isinstance(base_bias, nn.Parameter):
                base_bias.requires_grad_(True)
