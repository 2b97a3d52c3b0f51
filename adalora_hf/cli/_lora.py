"""The demo's plain-LoRA baseline layer, and the encoder's linear layers that both adapters
target."""

from __future__ import annotations

import math

import torch
from torch import nn

from adalora_torch._layers import is_conv1d

__all__ = ["LoRALinear", "encoder_linears", "target_modules"]


class LoRALinear(nn.Module):
    """Plain LoRA (Hu et al. 2021) around ``nn.Linear`` or transformers' ``Conv1D``:
    ``y = base(x) + x Aᵀ Bᵀ · alpha / r``, B = 0 at the start.

    Written here rather than taken from PEFT (a test-only dependency) or built from our SVD
    layers without allocation: the baseline should be LoRA as people use it (PEFT's LoRA init
    and scaling: A Kaiming-uniform, B zero), not AdaLoRA's parametrisation minus allocation. It
    has ``r·(in + out)`` parameters against ``r·(in + out + 1)`` per AdaLoRA triplet set, which
    on the demo's 48×48 matrices is 1% fewer at the same total rank.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        # nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores (in, out)
        fan_in, fan_out = (weight.shape[0], weight.shape[1]) if is_conv1d(base) else (
            weight.shape[1], weight.shape[0])  # fmt: skip
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def encoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every ``nn.Linear`` in the encoder (not the head)."""
    found = []
    for parent_name, parent in model.named_modules():
        if parent_name.startswith("classifier"):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name != "classifier":
                found.append((parent, name, child))
    return found


def target_modules(model: nn.Module) -> list[str]:
    """The names of the encoder's linear layers (transformers 4: query, key, value, dense;
    transformers 5: q_proj, k_proj, v_proj, o_proj, fc1, fc2)."""
    return sorted({name for _, name, _ in encoder_linears(model)})
