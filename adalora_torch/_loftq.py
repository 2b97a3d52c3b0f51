"""LoftQ initialisation: a quantized base weight and SVD triplets that together approximate the
full-precision weight (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
Language Models", ICLR 2024, https://arxiv.org/abs/2310.08659, Algorithm 1).

Starting from ``L₀ = 0``, each of ``T`` iterations quantizes what the low-rank part does not
carry, ``Q_t = quant(W − L_{t−1})``, and takes ``L_t`` as the best rank-``r`` approximation
(truncated SVD) of the residual ``W − dequant(Q_t)``. The result is ``Q_T`` for the base layer
and ``L_T = U_r S_r V_rᵀ`` in AdaLoRA's form: ``B = U_r`` ``(out, r)``, ``A = V_rᵀ`` ``(r, in)``
and ``E = S_r / s`` ``(r, 1)``, where ``s = lora_alpha / (r₀ + 1e-5)`` is the scale the layer
applies, so that the layer computes ``dequant(Q_T) + s · B diag(E) A = dequant(Q_T) + L_T``.
``E`` starts as the singular values (scaled) and the rank allocator prunes from there.

Quantization is bitsandbytes' own (``adalora[bnb]``): NF4/FP4 blocks for 4 bits, LLM.int8()
rows for 8 bits, with the settings of the layer that will hold the weight, so that the base
layer holds exactly ``Q_T``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ._bnb import (
    bnb_layer_class,
    dequantize_4bit,
    dequantize_8bit,
    quantize_4bit_like,
    quantize_8bit,
    store_4bit,
    store_8bit,
)
from ._layers import SVDLinear, is_conv1d

__all__ = [
    "LOFTQ_BITS",
    "LoftQInit",
    "check_loftq_settings",
    "check_loftq_target",
    "loftq_init",
    "loftq_layer",
]

LOFTQ_BITS = (4, 8)  # bitsandbytes' NF4 (4) and LLM.int8() (8); add a quantizer to extend
LOFTQ_4BIT: dict[str, Any] = {"quant_type": "nf4", "blocksize": 64, "compress_statistics": False}


def check_loftq_settings(bits: object, iterations: object) -> None:
    """The one check of LoftQ's settings: ``bits`` in ``LOFTQ_BITS``, ``iterations >= 1``.

    Raises ``ValueError`` saying what to change.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LOFTQ_BITS:
        raise ValueError(
            f"loftq_bits={bits!r} is not supported: use 4 (bitsandbytes NF4, blocks of 64) or "
            "8 (bitsandbytes LLM.int8() rows), the quantizations the adapter layers can hold."
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(
            f"loftq_iter={iterations!r} must be an integer >= 1 (the number of alternating "
            "quantize / SVD steps; 1 is LoftQ's cheapest setting, more lower the residual)."
        )


class LoftQInit(NamedTuple):
    """What ``loftq_init`` returns. ``quantized``: ``(packed data, QuantState)`` for 4 bits,
    ``(int8 rows, row absmax)`` for 8 bits; ``dequantized``: its float32 ``(out, in)`` value;
    ``lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)``, ``lora_B`` ``(out, r)``, float32."""

    quantized: tuple[torch.Tensor, Any]
    dequantized: torch.Tensor
    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor


Quantizer = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def _quantizer(bits: int, like: Any = None) -> Quantizer:
    """(quantize, dequantize) for ``bits``; 4 bits with the settings of the ``Params4bit``
    ``like`` (block size, type, statistics compression, storage, dtype quantized from)."""
    if bits == 8:
        return quantize_8bit, lambda q: dequantize_8bit(*q)
    return (lambda w: quantize_4bit_like(like, w)), (lambda q: dequantize_4bit(*q))


def _alternate(
    weight: torch.Tensor, rank: int, iterations: int, scale: float, quantizer: Quantizer
) -> LoftQInit:
    quantize, dequantize = quantizer
    w = weight.detach().to(torch.float32)
    lowrank = torch.zeros_like(w)
    for _ in range(iterations):
        q = quantize(w - lowrank)
        deq = dequantize(q).to(w.device)
        u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
        k = min(rank, s.numel())
        lowrank = u[:, :k] @ (s[:k, None] * vh[:k])
    out_f, in_f = w.shape
    a = torch.zeros(rank, in_f, device=w.device)
    e = torch.zeros(rank, 1, device=w.device)
    b = torch.zeros(out_f, rank, device=w.device)
    if k < rank:  # more triplets than the matrix has singular values: the rest start at E = 0
        nn.init.normal_(a, std=0.02)
        nn.init.normal_(b, std=0.02)
    a[:k], e[:k, 0], b[:, :k] = vh[:k], s[:k] / scale, u[:, :k]
    return LoftQInit(q, deq, a, e, b)


def loftq_init(
    weight: torch.Tensor, rank: int, bits: int = 4, iterations: int = 1, *, scale: float = 1.0
) -> LoftQInit:
    """LoftQ for one ``(out, in)`` float weight: ``Q`` and the triplets ``A, E, B``.

    ``scale`` is the factor the adapter layer applies to ``B diag(E) A``
    (``lora_alpha / (r₀ + 1e-5)``); ``E`` is divided by it. 4 bits use ``LOFTQ_4BIT`` (NF4,
    blocks of 64, uncompressed statistics) and quantize from ``weight``'s dtype; 8 bits use
    LLM.int8() rows. Needs bitsandbytes (so no doctest here: tests/torch/test_loftq.py).
    ``dequantized + lora_B @ (lora_E * scale * lora_A)`` is the fitted weight.
    """
    check_loftq_settings(bits, iterations)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"loftq_init needs a rank >= 1 (the triplets to fit), got {rank!r}.")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"loftq_init needs a floating-point (out, in) weight, got dtype {weight.dtype} and "
            f"shape {tuple(weight.shape)}."
        )
    if bits == 4:
        import bitsandbytes as bnb

        like = bnb.nn.Params4bit(
            torch.empty(0, dtype=weight.dtype), requires_grad=False, **LOFTQ_4BIT
        )
        return _alternate(weight, rank, iterations, scale, _quantizer(4, like))
    return _alternate(weight, rank, iterations, scale, _quantizer(8))


def quantize_linear(module: nn.Module, bits: int) -> nn.Module:
    """A bitsandbytes layer (``Linear4bit`` with ``LOFTQ_4BIT``, or ``Linear8bitLt`` with
    threshold 6.0 as transformers loads int8 models) holding the plainly quantized weight of
    the ``nn.Linear`` or transformers ``Conv1D`` ``module``, with its bias, on its device."""
    import bitsandbytes as bnb

    w = _dense_weight(module)
    out_f, in_f = w.shape
    bias = getattr(module, "bias", None)
    new: Any
    if bits == 4:
        new = bnb.nn.Linear4bit(
            in_f, out_f, bias=bias is not None, compute_dtype=w.dtype, device="meta",
            quant_storage=torch.uint8, **{k: v for k, v in LOFTQ_4BIT.items() if k != "blocksize"},
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(w.detach(), requires_grad=False, module=new, **LOFTQ_4BIT)
        store_4bit(new, *quantize_4bit_like(new.weight, w))
    else:
        new = bnb.nn.Linear8bitLt(
            in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=6.0,
            device="meta",
        )  # fmt: skip
        store_8bit(new, *quantize_8bit(w))
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return new  # type: ignore[no-any-return]


def check_loftq_target(name: str, module: nn.Module) -> None:
    """The one check of a module LoftQ is to quantize: a full-precision ``nn.Linear`` or
    ``Conv1D`` (not a bitsandbytes layer) with finite weights. Raises ``ValueError`` saying
    what to do instead."""
    weight = getattr(module, "weight", None)
    dense = isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
    linear = isinstance(module, nn.Linear) or is_conv1d(module)
    if not (linear and dense and bnb_layer_class(module) is None):
        raise ValueError(
            f"LoftQ initialisation needs the full-precision weight of every target, but "
            f"{name!r} is a {type(module).__name__}: LoftQ quantizes nn.Linear and Conv1D "
            "targets itself, so create the adapter on the full-precision model (loaded "
            "without a quantization_config) and narrow the targets to linear layers."
        )
    assert isinstance(weight, torch.Tensor)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"The weight of {name!r} has NaN or inf entries, which LoftQ cannot quantize "
            "or decompose: repair the base model's weights first."
        )


def _dense_weight(module: nn.Module) -> torch.Tensor:
    check_loftq_target("the layer", module)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().T if is_conv1d(module) else weight.detach()


def loftq_layer(
    layer: SVDLinear, weight: torch.Tensor, adapter_name: str = "default", iterations: int = 1
) -> None:
    """Run LoftQ on an ``SVDLinear4bit`` / ``SVDLinear8bitLt``: its base layer gets ``Q`` (with
    the base's own quantization settings) and adapter ``adapter_name`` gets ``A, E, B``, from
    the full-precision ``(out, in)`` ``weight`` the base was quantized from."""
    base: Any = layer.base_layer
    cls = bnb_layer_class(base)
    if cls is None:
        raise ValueError(
            f"loftq_layer needs an adapter on a bitsandbytes Linear4bit or Linear8bitLt, got "
            f"one on {type(base).__name__}."
        )
    bits = 8 if cls.__name__.endswith("8bitLt") else 4
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"The full-precision weight has shape {tuple(weight.shape)}, the layer needs "
            f"(out, in) = ({layer.out_features}, {layer.in_features}) (transpose a Conv1D "
            "weight)."
        )
    check_loftq_settings(bits, iterations)
    scale = float(layer._scale(adapter_name))
    like = base.weight if bits == 4 else None
    # Q depends on the rank of the fit from the second iteration on: fit at the creation rank
    # r0 always, so that an adapter created smaller (a saved, pruned one being loaded) gets the
    # Q its triplets were trained on; it keeps the leading r triplets
    r, r0 = layer.r[adapter_name], int(layer.ranknum[adapter_name].item())
    init = _alternate(
        weight.to(layer.lora_A[adapter_name].device), r0, iterations, scale, _quantizer(bits, like)
    )
    (store_4bit if bits == 4 else store_8bit)(base, *init.quantized)
    with torch.no_grad():
        layer.lora_A[adapter_name].copy_(init.lora_A[:r])
        layer.lora_E[adapter_name].copy_(init.lora_E[:r])
        layer.lora_B[adapter_name].copy_(init.lora_B[:, :r])
