"""The warning that AdaLoRA acts as plain LoRA: a run trains without ``update_and_allocate``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from adalora_torch._layers import iter_svd_layers

__all__ = ["PlainLoraWatch"]

# Forward calls (training mode, with a loss) after which a run that never calls
# update_and_allocate is told that AdaLoRA is acting as plain LoRA.
_FORWARDS = 10


class PlainLoraWatch:
    """Counts training forward passes and optimizer steps until the first allocation, and
    warns once when ``_FORWARDS`` passes and at least one optimizer step came without any.

    Optimizer steps are seen as a change of one small trainable tensor (the first layer's A)
    between forward passes (version counters miss fused optimizers), so gradient accumulation
    does not trigger the warning. Checks stop at the first allocation (``allocated``).
    """

    def __init__(self) -> None:
        self.allocations = 0  # update_and_allocate calls (or a restored allocator state)
        self.forwards = 0
        self.steps_seen = 0
        self.snapshot: torch.Tensor | None = None
        self.warned = False

    def allocated(self) -> None:
        """Record an allocation: the run is AdaLoRA, the watch stops."""
        self.allocations += 1

    def training_forward(self, model: nn.Module, adapter_name: str) -> None:
        """Record a training forward pass of ``model`` training ``adapter_name``; warn (once,
        pointing at the caller of the model's forward) when the run acts as plain LoRA."""
        if self.allocations or self.warned:
            return
        self.forwards += 1
        first = next(iter_svd_layers(model, adapter_name), None)
        if first is not None:
            current = first[1].lora_A[adapter_name].detach()
            before = self.snapshot
            if (
                before is not None
                and before.device == current.device
                and not torch.equal(current, before)
            ):
                self.steps_seen += 1
            self.snapshot = current.clone()
        if self.forwards >= _FORWARDS and self.steps_seen >= 1:
            self.warned = True
            warnings.warn(
                f"AdaLoRA is acting as plain LoRA: {self.forwards} training forward "
                "passes and no call of update_and_allocate, so no rank is ever reallocated. "
                "Call model.base_model.update_and_allocate(step) after optimizer.step() (before "
                "zero_grad()), or add adalora_hf.AdaLoraCallback() to the Trainer's callbacks.",
                UserWarning,
                stacklevel=4,
            )
