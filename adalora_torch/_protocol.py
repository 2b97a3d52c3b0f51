"""What an AdaLoRA adapter layer offers to the hook, the penalty and the exporters.

The allocator, ``orthogonal_penalty``, ``shrink_to_pattern`` and ``to_lora_state_dict`` find
adapter layers with ``isinstance(module, SVDAdapter)``, never by matching ``"lora_"`` in
parameter names, so adapter names that are substrings of each other stay apart.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

__all__ = ["SVDAdapter"]


@runtime_checkable
class SVDAdapter(Protocol):
    """An adapter layer with one SVD triplet set ``(A, E, B)`` per adapter name.

    Shapes, for adapter ``name`` of current rank ``r``:
    ``lora_A[name]``: ``(r, in_features)`` (for a convolution ``(r, in * kh * kw)``),
    ``lora_E[name]``: ``(r, 1)``, ``lora_B[name]``: ``(out_features, r)``. The rank dimension
    is dim 0 of A and E and dim 1 of B. ``ranknum[name]`` is a frozen 1-element parameter
    holding ``r₀``, the rank at creation (it does not change when triplets are masked or
    shrunk, so the scale of the update is preserved).
    """

    base_layer: nn.Module
    lora_A: nn.ParameterDict
    lora_E: nn.ParameterDict
    lora_B: nn.ParameterDict
    ranknum: nn.ParameterDict

    def set_rank(self, adapter_name: str, keep: object) -> None:
        """Physically keep only the triplets where the boolean tensor ``keep`` (shape (r,)) is
        True: slices A, E, B in place (new Parameters), leaves ``ranknum`` unchanged."""
        ...
