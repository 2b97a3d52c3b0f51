"""SVD adapter layers on bitsandbytes' quantized linear layers (``Linear8bitLt``, ``Linear4bit``).

They are ``SVDLinear`` with two differences: the sizes come from the base layer's
``in_features``/``out_features`` (a 4-bit weight is packed, its shape is not the layer's), and a
merge goes dequantize -> add ``ΔW`` in float32 -> requantize with the layer's own settings, so a
float update is never written into integer storage. The adapter path itself is ``SVDLinear``'s:
float32 parameters, the input cast to float32, the sum cast back to the base output's dtype.

bitsandbytes is an optional dependency (``adalora[bnb]``): this module imports it only inside
the functions that need it, and ``bnb_layer_class`` looks at ``sys.modules`` so that a model
without bitsandbytes layers never imports it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ._layers import SVDLinear

__all__ = ["SVDLinear4bit", "SVDLinear8bitLt", "bnb_layer_class", "dequantize_weight"]


def bnb_layer_class(module: nn.Module) -> type[SVDLinear] | None:
    """The SVD layer class for a bitsandbytes layer (None for anything else). Imports nothing:
    a bitsandbytes layer exists only once bitsandbytes has been imported."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return SVDLinear8bitLt
    if isinstance(module, bnb.nn.Linear4bit):
        return SVDLinear4bit
    return None


def _is_quantized(weight: torch.Tensor) -> bool:
    return not weight.dtype.is_floating_point


def dequantize_weight(base: Any) -> torch.Tensor:
    """The float32 ``(out, in)`` weight a bitsandbytes ``Linear8bitLt``/``Linear4bit`` computes
    with (a copy; for an unquantized weight, the weight itself in float32)."""
    import bitsandbytes.functional as bf

    weight = base.weight
    if not _is_quantized(weight):
        return weight.detach().to(torch.float32)
    if hasattr(weight, "quant_state"):  # Params4bit
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # the CPU inference kernels repack the weight on first eval forward; undo that
            data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
            if not state.nested and state.absmax.dim() == 2:
                # bitsandbytes 0.50's inverse leaves a plain absmax in the packed layout,
                # (in / blocksize, out) bfloat16; back to one scale per block, in order
                state.absmax = state.absmax.T.reshape(-1).to(torch.float32)
            weight.data, weight.quant_state = data, state
            base.quant_state = state
        return dequantize_4bit(data, state)
    # Int8Params: int8 rows and their absmax scales, kept on the weight until the first forward
    # moves them to the layer's matmul state
    scb = getattr(base.state, "SCB", None)
    if scb is None:
        scb = weight.SCB
    return dequantize_8bit(weight.data, scb.to(weight.device))


def quantize_8bit(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 rows, row absmax)`` of a float ``(out, in)`` weight, bitsandbytes' LLM.int8()
    scheme (through float16, as ``Linear8bitLt`` quantizes)."""
    import bitsandbytes.functional as bf

    cb, scb, _ = bf.int8_vectorwise_quant(dense.to(torch.float16).contiguous())
    return cb, scb


def dequantize_8bit(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The float32 weight of ``quantize_8bit``'s result."""
    import bitsandbytes.functional as bf

    return bf.int8_vectorwise_dequant(cb, scb).to(torch.float32)


def store_8bit(base: Any, cb: torch.Tensor, scb: torch.Tensor) -> None:
    """Make the ``Linear8bitLt`` ``base`` hold the int8 weight ``(cb, scb)``."""
    import bitsandbytes as bnb

    base.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    base.state.reset_grads()  # the next forward takes CB/SCB from the new weight


def quantize_4bit_like(weight: Any, dense: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(packed data, QuantState)`` of the float ``(out, in)`` weight ``dense`` with the
    settings of the ``Params4bit`` ``weight``: block size, quantization type (NF4/FP4),
    statistics compression, storage dtype, and the float dtype it was quantized from."""
    import bitsandbytes.functional as bf

    state = getattr(weight, "quant_state", None)
    dtype = state.dtype if state is not None else weight.dtype
    return bf.quantize_4bit(  # type: ignore[no-any-return]
        dense.to(dtype).contiguous(),
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
    )


def dequantize_4bit(data: torch.Tensor, state: Any) -> torch.Tensor:
    """The float32 weight of ``quantize_4bit_like``'s result."""
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(data, state).to(torch.float32)


def store_4bit(base: Any, data: torch.Tensor, state: Any) -> None:
    """Make the ``Linear4bit`` ``base`` hold the packed weight ``(data, state)``, keeping the
    settings of its current weight."""
    import bitsandbytes as bnb

    weight = base.weight
    base.weight = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=state,
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        bnb_quantized=True,
        module=base,
    )
    base.quant_state = state


def _check_finite(w: torch.Tensor, name: str, storage: str) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(
            f"Merging adapter {name!r} gives non-finite weights{storage}; the adapter is "
            "broken (NaN/inf in A, E or B) or too large. The base weight is unchanged."
        )


class SVDLinear8bitLt(SVDLinear):
    """AdaLoRA adapter around ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8()).

    A merge dequantizes the int8 rows, adds ``ΔW`` and requantizes row-wise (through float16,
    as bitsandbytes quantizes); ``safe_merge=True`` refuses a result that is not finite in
    float16. Each merge and unmerge rounds to the int8 grid again (docs/quantized.md).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, **kw: Any):
        import bitsandbytes as bnb

        if not isinstance(base, bnb.nn.Linear8bitLt):
            raise ValueError(
                f"SVDLinear8bitLt wraps bitsandbytes.nn.Linear8bitLt, got {type(base).__name__}."
            )
        super().__init__(base, rank, alpha, dropout, **kw)

    def _add_to_weight(self, delta: torch.Tensor, name: str, safe_merge: bool) -> None:
        base: Any = self.base_layer  # bitsandbytes' own attributes are untyped
        weight = base.weight
        if not _is_quantized(weight):  # has_fp16_weights=True: a float weight, added in place
            super()._add_to_weight(delta, name, safe_merge)
            return
        merged = (dequantize_weight(base) + delta.to(weight.device)).to(torch.float16)
        if safe_merge:
            _check_finite(merged, name, " in float16")
        store_8bit(base, *quantize_8bit(merged))


class SVDLinear4bit(SVDLinear):
    """AdaLoRA adapter around ``bitsandbytes.nn.Linear4bit`` (NF4/FP4, QLoRA).

    A merge dequantizes the blocks, adds ``ΔW`` and requantizes with the weight's block size,
    quantization type, statistics compression and storage dtype; ``safe_merge=True`` refuses
    a non-finite result. Each merge and unmerge rounds to the 4-bit grid again
    (docs/quantized.md).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, **kw: Any):
        import bitsandbytes as bnb

        if not isinstance(base, bnb.nn.Linear4bit):
            raise ValueError(
                f"SVDLinear4bit wraps bitsandbytes.nn.Linear4bit, got {type(base).__name__}."
            )
        super().__init__(base, rank, alpha, dropout, **kw)

    def _add_to_weight(self, delta: torch.Tensor, name: str, safe_merge: bool) -> None:
        base: Any = self.base_layer  # bitsandbytes' own attributes are untyped
        weight = base.weight
        if not _is_quantized(weight):  # not quantized yet (still on the meta/CPU float path)
            super()._add_to_weight(delta, name, safe_merge)
            return
        dense = dequantize_weight(base)
        state = weight.quant_state
        merged = (dense + delta.to(dense.device)).to(state.dtype)
        if safe_merge:
            _check_finite(merged, name, "")
        store_4bit(base, *quantize_4bit_like(weight, merged))
