"""Put SVD adapter layers into any ``nn.Module``, and choose what trains."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ._bnb import SVDLinear4bit, SVDLinear8bitLt, bnb_layer_class
from ._layers import SVDConv2d, SVDEmbedding, SVDLinear, _SVDLayerBase, is_conv1d, iter_svd_layers
from ._loftq import (
    _dense_weight,
    check_loftq_settings,
    check_loftq_target,
    loftq_layer,
    quantize_linear,
)

__all__ = ["inject_adapters", "mark_only_adapters_trainable"]

# (bitsandbytes' Linear8bitLt/Linear4bit are nn.Linear subclasses)
_SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Conv2d (groups=1) and nn.Embedding"

# packages and class names of quantized layers whose storage we cannot dequantize and
# requantize (GPTQ, AWQ, HQQ, torchao, quanto, EETQ, AQLM, fp8, ...), detected by name so that
# none of them is imported
_QUANT_PACKAGES = (
    "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum", "quanto", "eetq", "aqlm",
    "vptq", "fbgemm_gpu", "compressed_tensors", "bitsandbytes", "exllama", "marlin", "spqr",
)  # fmt: skip
_QUANT_NAME = re.compile(r"(?i)quant|gptq|awq|hqq|marlin|exllama|fp8|int8|int4|[48]bit")


def _unsupported_quantized(module: nn.Module) -> str | None:
    """Why ``module`` is a quantized layer we cannot adapt safely, or None."""
    if isinstance(module, _SVDLayerBase) or bnb_layer_class(module) is not None:
        return None  # ours, or bitsandbytes 8-bit/4-bit: merged by dequantize, add, requantize
    cls = type(module)
    weight = getattr(module, "weight", None)
    wtype = type(weight)
    if cls.__module__.split(".")[0] in _QUANT_PACKAGES or _QUANT_NAME.search(cls.__name__):
        what = f"a quantized layer ({cls.__module__}.{cls.__qualname__})"
    elif isinstance(weight, torch.Tensor) and wtype.__module__.split(".")[0] != "torch":
        what = f"a layer whose weight is a {wtype.__module__}.{wtype.__qualname__}"
    elif isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
        what = f"a {cls.__name__} whose weight has the non-floating dtype {weight.dtype}"
    else:
        return None
    return (
        f"{what}; adapters on quantized layers are supported only for bitsandbytes' "
        "Linear8bitLt and Linear4bit, whose merges dequantize, add and requantize (merging "
        "a float update into other integer storage would silently damage the model)"
    )


def name_matches(name: str, targets: Sequence[str] | str) -> bool:
    r"""Whether module ``name`` is one of ``targets``, with PEFT's semantics: a string is a
    full-match regex; a list entry matches the whole name or its last dot-separated components.
    The one matcher of module names (targets, ``modules_to_save``).

    >>> name_matches("encoder.layer.0.attention.query", ["query"])
    True
    >>> name_matches("encoder.layer.0.attention.query", ["uery"])
    False
    >>> name_matches("encoder.layer.0.attention.query", r".*\.0\..*query")
    True
    """
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


def _adapter_dims(module: nn.Module) -> tuple[int, int] | str:
    """(columns of A, rows of B) of an adapter on ``module``, or why it cannot have one."""
    if isinstance(module, _SVDLayerBase):
        return module._a_cols(), module._b_rows()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        shape: Any = module.weight.shape  # (in, out)
        return int(shape[0]), int(shape[1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"an nn.Conv2d with groups={module.groups} (only groups=1 is supported)"
        return int(module.weight[0].numel()), module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return f"a {type(module).__name__}"


class PlannedAdapter(NamedTuple):
    """One adapter ``inject_adapters`` would create: ``lora_A`` ``(rank, a_cols)``, ``lora_E``
    ``(rank, 1)``, ``lora_B`` ``(b_rows, rank)``."""

    name: str  # as in model.named_modules()
    module: nn.Module  # the module now (a base layer, or an SVD layer getting another adapter)
    rank: int
    a_cols: int
    b_rows: int


def plan_adapters(
    model: nn.Module,
    targets: Sequence[str] | str,
    *,
    adapter_name: str = "default",
    rank: int = 12,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
) -> list[PlannedAdapter]:
    """What ``inject_adapters`` with these arguments would do, without changing ``model``.

    Raises the ``ValueError`` that ``inject_adapters`` would (nothing matches, a matched module
    has an unsupported type, the adapter exists already, a ``rank_pattern`` entry names no
    adapted module or exceeds ``rank``), so callers can validate everything first.
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
    matched: list[str] = []
    plan: list[PlannedAdapter] = []
    for name, module in modules:
        if not name or any(name.startswith(p) for p in svd_prefixes):
            continue  # the root, or the insides of an existing adapter layer
        if not name_matches(name, targets):
            continue
        matched.append(name)
        if layer_filter is not None and _layer_index(name, layers_pattern) not in layer_filter:
            continue
        dims = _unsupported_quantized(module) or _adapter_dims(module)
        if isinstance(dims, str):
            raise ValueError(
                f"Module {name!r} matches the targets but is {dims}; supported types are "
                f"{_SUPPORTED}. Narrow the targets to those layers."
            )
        if isinstance(module, _SVDLayerBase) and adapter_name in module.lora_A:
            raise ValueError(
                f"Module {name!r} already has an adapter {adapter_name!r}: choose another "
                "adapter_name or delete that adapter first."
            )
        plan.append(PlannedAdapter(name, module, rank, *dims))

    if not plan:
        if layer_filter is not None and matched:
            indices = sorted(
                {i for n in matched if (i := _layer_index(n, layers_pattern)) is not None}
            )
            raise ValueError(
                f"{len(matched)} modules match the targets but none has a layer index in "
                f"layers_to_transform={layers_to_transform!r} (layers_pattern="
                f"{layers_pattern!r}); their layer indices are {indices}. Pick indices from "
                "that list, or fix layers_pattern."
            )
        names = [n for n, _ in modules if n][:12]
        raise ValueError(
            f"No module of the model matches targets={targets!r}. Change the targets "
            f"(list entries match a name or its last components; a string is a full-match "
            f"regex). Some module names: {names}."
        )
    if rank_pattern:
        for key, value in rank_pattern.items():
            hits = [k for k, p in enumerate(plan) if p.name == key or p.name.endswith("." + key)]
            if not hits:
                raise ValueError(
                    f"rank_pattern names {key!r}, which is not among the adapted modules "
                    f"{[p.name for p in plan][:8]}: remove it or fix the targets."
                )
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= rank:
                raise ValueError(
                    f"rank_pattern[{key!r}] must be an integer in [0, rank={rank}], got {value!r}."
                )
            for k in hits:
                plan[k] = plan[k]._replace(rank=int(value))
    return plan


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
    activate: bool = True,
    loftq_bits: int | None = None,
    loftq_iter: int = 1,
) -> list[str]:
    """Replace the target submodules of ``model`` in place by SVD adapter layers.

    ``targets``: a string is a regex that must match the whole module name
    (``re.fullmatch``); a list matches a module whose name equals an entry or ends with
    ``"." + entry`` (PEFT's semantics). ``layers_to_transform`` keeps only modules whose layer
    index (the integer after a ``layers_pattern`` component such as ``"layers"``, or, without a
    pattern, the first integer component of the name) is in it. ``rank_pattern`` maps module
    names (same matching as a list target) to the rank to create them with (used to load a
    shrunk adapter); others get ``rank``, and every adapter keeps ``ranknum = rank`` (r₀), so
    a shrunk adapter keeps the scale it was trained with. A module that already is an SVD
    layer gets a new adapter ``adapter_name`` (``add_adapter``). ``activate=False`` leaves
    the set of active adapters of every layer as it was (PEFT's ``add_adapter``). Base
    parameters keep their ``requires_grad``; see ``mark_only_adapters_trainable``.

    ``loftq_bits`` (4 or 8): LoftQ initialisation (``adalora_torch._loftq``). Every target must
    be a full-precision ``nn.Linear`` or ``Conv1D``; each is replaced by a bitsandbytes
    ``Linear4bit`` (NF4) or ``Linear8bitLt`` holding the LoftQ-quantized weight, under an
    ``SVDLinear4bit`` / ``SVDLinear8bitLt`` whose triplets start from the top singular triplets
    of the quantization residual, after ``loftq_iter`` alternating steps.

    Returns the adapted module names as in ``model.named_modules()``. Raises ``ValueError``,
    before changing anything, when nothing matches, a matched module has an unsupported type
    or already has ``adapter_name``, or ``rank_pattern`` does not fit (``plan_adapters``).

    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> inject_adapters(m, ["0", "2"], rank=2)
    ['0', '2']
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
    plan = plan_adapters(
        model,
        targets,
        adapter_name=adapter_name,
        rank=rank,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=rank_pattern,
    )
    if loftq_bits is not None:
        check_loftq_targets(plan, loftq_bits, loftq_iter)
    for name, module, r, _, _ in plan:
        if loftq_bits is not None:
            new = _wrap_loftq(module, r, alpha, dropout, adapter_name, loftq_bits, loftq_iter, rank)
        elif isinstance(module, _SVDLayerBase):
            module.add_adapter(
                adapter_name, r, alpha, dropout, init_weights, ranknum=rank, activate=activate
            )
            continue
        else:
            new = _wrap(module, r, alpha, dropout, adapter_name, fan_in_fan_out, init_weights, rank)
        if not activate:
            new.set_adapter([])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return [p.name for p in plan]


def _wrap(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    adapter_name: str,
    fan_in_fan_out: bool,
    init_weights: bool,
    ranknum: int,
) -> _SVDLayerBase:
    args = (rank, alpha, dropout)
    kw: dict[str, Any] = {
        "adapter_name": adapter_name,
        "init_weights": init_weights,
        "ranknum": ranknum,
    }
    if isinstance(module, nn.Conv2d):
        return SVDConv2d(module, *args, **kw)
    if isinstance(module, nn.Embedding):
        return SVDEmbedding(module, *args, **kw)
    bnb_class = bnb_layer_class(module)
    if bnb_class is not None:
        return bnb_class(module, *args, **kw)
    # nn.Linear or Conv1D (plan_adapters refused anything else)
    return SVDLinear(module, *args, fan_in_fan_out=fan_in_fan_out or is_conv1d(module), **kw)


def check_loftq_targets(plan: Sequence[PlannedAdapter], bits: int, iterations: int) -> None:
    """Raise unless LoftQ can initialise every planned adapter: settings supported, every
    target a full-precision ``nn.Linear`` / ``Conv1D``, bitsandbytes installed."""
    check_loftq_settings(bits, iterations)
    for p in plan:
        m = p.module
        if isinstance(m, _SVDLayerBase):
            raise ValueError(
                f"{p.name!r} already holds an adapter, and LoftQ replaces the base weight that "
                "every adapter of the layer pairs with: start from a fresh full-precision "
                "model (to load a saved LoftQ adapter next to others, load it onto the "
                "quantized base that unload() returns)."
            )
        check_loftq_target(p.name, m)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            "LoftQ initialisation quantizes with bitsandbytes, which is not installed: "
            "pip install 'adalora[bnb]'."
        ) from None


def _wrap_loftq(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    adapter_name: str,
    bits: int,
    iterations: int,
    ranknum: int,
) -> _SVDLayerBase:
    weight = _dense_weight(module)  # (out, in)
    cls = SVDLinear4bit if bits == 4 else SVDLinear8bitLt
    kw: dict[str, Any] = {"adapter_name": adapter_name, "ranknum": ranknum}
    new = cls(quantize_linear(module, bits), rank, alpha, dropout, **kw)
    loftq_layer(new, weight, adapter_name, iterations)
    return new


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
    for _, m in iter_svd_layers(model, adapter_name):
        for d in (m.lora_A, m.lora_E, m.lora_B):
            d[adapter_name].requires_grad_(True)
        base_bias = getattr(m.base_layer, "bias", None)
        if bias == "lora_only" and isinstance(base_bias, nn.Parameter):
            base_bias.requires_grad_(True)
