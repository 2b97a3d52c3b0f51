"""The demo's fine-tuning runs on the frozen backbone (AdaLoRA, plain LoRA at a given rank, the
head alone), their shared settings and the row of the results table each one yields.

All of them see the same batches in the same order, with the same optimizer and learning rate,
and are scored on the same held-out half of digits 5-9.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ._data import NUM_CLASSES, Split, accuracy, batches, cross_entropy, progress_bar
from ._inspect import AdapterSummary, read_adapter
from ._lora import LoRALinear, encoder_linears, target_modules

if TYPE_CHECKING:
    from .. import AdaLoraConfig

__all__ = ["DemoSettings", "MethodResult", "run_adalora", "run_head", "run_lora"]


@dataclass(frozen=True)
class DemoSettings:
    """Adaptation hyperparameters, shared by the three methods where they apply."""

    steps: int = 300  # optimizer steps per method (AdaLoRA's total_step)
    batch_size: int = 32
    lr: float = 1e-2  # AdamW, linear decay to 0; the same for every method
    init_r: int = 8  # AdaLoRA: rank of every matrix at the start
    target_r: int = 1  # AdaLoRA: average final rank; LoRA's rank at equal final parameters
    scale: float = 2.0  # both adapters multiply their update by this (AdaLoRA: lora_alpha/init_r)
    tinit_frac: float = 0.1  # warm-up steps as a fraction of steps
    tfinal_frac: float = 0.2  # final steps as a fraction of steps
    deltaT: int = 10  # steps between allocations
    orth_reg_weight: float = 0.5
    test_size: float = 0.5  # held-out share of digits 5-9

    @property
    def lora_alpha(self) -> float:
        """AdaLoRA's ``lora_alpha``: its update is scaled by ``lora_alpha / init_r = scale``."""
        return self.scale * self.init_r

    @property
    def tinit(self) -> int:
        """Warm-up steps."""
        return int(self.steps * self.tinit_frac)

    @property
    def tfinal(self) -> int:
        """Final steps with fixed ranks."""
        return int(self.steps * self.tfinal_frac)

    def adalora_config(self, **extra: Any) -> AdaLoraConfig:
        """The ``AdaLoraConfig`` of these settings (``extra``: targets and the like); raises
        ``ValueError`` for settings AdaLoRA refuses."""
        from .. import AdaLoraConfig

        return AdaLoraConfig(
            init_r=self.init_r,
            target_r=self.target_r,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.deltaT,
            total_step=self.steps,
            orth_reg_weight=self.orth_reg_weight,
            lora_alpha=self.lora_alpha,
            **extra,
        )


@dataclass
class MethodResult:
    """One row of the table."""

    method: str
    accuracy: float
    test_loss: float  # cross-entropy (nats) on the test split: the continuous metric
    adapter_params: int  # adapter parameters at the end (after AdaLoRA's pruning)
    head_params: int
    trained_params: int  # parameters with requires_grad during training
    seconds: float
    losses: list[float] = field(default_factory=list)  # cross-entropy per step


def _new_head(model: Any, seed: int) -> None:
    torch.manual_seed(seed)
    old = model.classifier
    model.classifier = nn.Linear(old.in_features, NUM_CLASSES).to(old.weight.device)


def count(params: Any) -> int:
    """The number of elements over ``params``."""
    return sum(p.numel() for p in params)


def _fresh(base: nn.Module, seed: int) -> Any:
    model = copy.deepcopy(base)
    _new_head(model, seed)
    return model


def _train(
    model: nn.Module,
    data: dict[str, Split],
    settings: DemoSettings,
    seed: int,
    desc: str,
    show_progress: bool,
    after_step: Callable[[int], None] | None = None,
) -> tuple[list[float], float]:
    """AdamW with linear decay on the trainable parameters; returns per-step CE and seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / settings.steps)
    losses = []
    model.train()
    start = time.perf_counter()
    seeded = batches(data["train"], settings.batch_size, settings.steps, seed + 1)
    shown = progress_bar(seeded, settings.steps, desc, show_progress)
    for step, batch in enumerate(shown, start=1):
        out = model(pixel_values=batch.x, labels=batch.y)
        out.loss.backward()  # AdaLoRA: cross-entropy + orth_reg_weight · orthogonal penalty
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)  # steps 1..total_step, as AdaLoraCallback counts them
        optimizer.zero_grad()
        losses.append(float(F.cross_entropy(out.logits.detach(), batch.y)))
    if data["train"].x.is_cuda:
        torch.cuda.synchronize()
    return losses, time.perf_counter() - start


def run_head(
    base: nn.Module, data: dict[str, Split], s: DemoSettings, seed: int, pb: bool
) -> MethodResult:
    """Train a new head alone on the frozen ``base`` (a linear probe)."""
    model = _fresh(base, seed)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    trained = count(p for p in model.parameters() if p.requires_grad)
    losses, seconds = _train(model, data, s, seed, "head only", pb)
    head = count(model.classifier.parameters())
    acc, ce = accuracy(model, data["test"]), cross_entropy(model, data["test"])
    return MethodResult("head", acc, ce, 0, head, trained, seconds, losses)


def run_lora(
    base: nn.Module,
    data: dict[str, Split],
    s: DemoSettings,
    seed: int,
    pb: bool,
    rank: int | None = None,
) -> MethodResult:
    """Plain LoRA at ``rank`` (default ``target_r``: AdaLoRA's final parameter count;
    ``init_r`` is the ceiling, AdaLoRA's starting size kept to the end) on every encoder
    linear layer, plus a new head; the row is named ``LoRA r=<rank>``."""
    r = s.target_r if rank is None else rank
    model = _fresh(base, seed)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    adapter = 0
    for parent, name, layer in encoder_linears(model):
        wrapped = LoRALinear(layer, r, s.scale * r)
        setattr(parent, name, wrapped)
        adapter += count([wrapped.lora_A, wrapped.lora_B])
    model.classifier.requires_grad_(True)
    trained = count(p for p in model.parameters() if p.requires_grad)
    losses, seconds = _train(model, data, s, seed, f"LoRA r={r}", pb)
    head = count(model.classifier.parameters())
    acc, ce = accuracy(model, data["test"]), cross_entropy(model, data["test"])
    return MethodResult(f"LoRA r={r}", acc, ce, adapter, head, trained, seconds, losses)


def _current_budget(model: nn.Module, returned: object) -> int | None:
    """The allocator's budget after ``update_and_allocate``: its return value, else
    ``model.rankallocator.budget``; None when neither is there."""
    if isinstance(returned, int):
        return returned
    budget = getattr(getattr(model, "rankallocator", None), "budget", None)
    return budget if isinstance(budget, int) else None


def run_adalora(
    base: nn.Module,
    data: dict[str, Split],
    s: DemoSettings,
    seed: int,
    pb: bool,
    out: Path,
) -> tuple[MethodResult, list[int], AdapterSummary, float]:
    """AdaLoRA through the library's own API (``AdaLoraConfig`` + ``AdaLoraModel``,
    ``update_and_allocate`` after every optimizer step) on every encoder linear layer, the new
    head in ``modules_to_save``; saves the adapter to ``out/adalora-adapter`` and reloads it.

    Returns the row, the budget after every step, the saved adapter's summary and the test
    accuracy of the reloaded model.
    """
    from adalora_core import budget_schedule

    from .. import AdaLoraModel

    model = _fresh(base, seed)
    targets = target_modules(model)
    config = s.adalora_config(target_modules=targets, modules_to_save=["classifier"])
    torch.manual_seed(seed)
    ada = AdaLoraModel(model, config, adapter_name="default")
    trained = count(p for p in ada.parameters() if p.requires_grad)
    n = len(encoder_linears(base))
    budgets: list[int] = []

    def after_step(step: int) -> None:
        budget = _current_budget(ada, ada.update_and_allocate(step))
        if budget is None:  # allocator not reachable: the schedule it follows
            budget, _ = budget_schedule(
                step,
                init_budget=s.init_r * n,
                target_budget=s.target_r * n,
                tinit=s.tinit,
                tfinal=s.tfinal,
                total_step=s.steps,
                deltaT=s.deltaT,
            )
        budgets.append(int(budget))

    losses, seconds = _train(
        ada, data, s, seed, f"AdaLoRA r {s.init_r}->{s.target_r}", pb, after_step
    )
    test_accuracy = accuracy(ada, data["test"])
    adapter_dir = out / "adalora-adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    ada.save_pretrained(adapter_dir)
    summary = read_adapter(adapter_dir)
    # the saved files alone reproduce the model: reload onto a fresh copy of the backbone
    reloaded = AdaLoraModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    reloaded_accuracy = accuracy(reloaded, data["test"])
    head = sum(summary.other_params.values())  # the saved classifier (modules_to_save)
    row = MethodResult(
        "AdaLoRA",
        test_accuracy,
        cross_entropy(ada, data["test"]),
        summary.adapter_params,
        head,
        trained,
        seconds,
        losses,
    )
    return row, budgets, summary, reloaded_accuracy
