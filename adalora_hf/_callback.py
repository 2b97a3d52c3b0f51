"""``AdaLoraCallback``: AdaLoRA's rank allocation inside ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._checkpoint import ALLOCATOR_STATE
from ._model import AdaLoraModel

__all__ = ["AdaLoraCallback"]

logger = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


def find_adalora_model(model: Any) -> AdaLoraModel:
    """The ``AdaLoraModel`` inside ``model`` (itself, ``get_peft_model``'s result, or either
    wrapped by DDP / ``torch.compile``)."""
    for _ in range(8):
        if isinstance(model, AdaLoraModel):
            return model
        inner = model.__dict__.get("_modules", {}) if isinstance(model, nn.Module) else {}
        model = inner.get("base_model") or inner.get("module") or inner.get("_orig_mod")
        if model is None:
            break
    raise ValueError(
        "AdaLoraCallback found no AdaLoraModel in the Trainer's model: pass the model returned by "
        "adalora_hf.AdaLoraModel(...) or adalora_hf.get_peft_model(...) to the Trainer."
    )


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    return os.path.join(args.output_dir or "", f"{_CHECKPOINT_PREFIX}-{state.global_step}")


def _earlier_complete_checkpoint(args: TrainingArguments, step: int) -> str:
    """A hint naming the latest earlier checkpoint that has the allocator state (the Trainer
    writes it last, so a run killed while saving leaves a checkpoint without it)."""
    root = args.output_dir or ""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        head, _, number = name.partition("-")
        complete = os.path.isfile(os.path.join(root, name, ALLOCATOR_STATE))
        if head == _CHECKPOINT_PREFIX and number.isdigit() and int(number) < step and complete:
            found.append((int(number), os.path.join(root, name)))
    if not found:
        return ""
    return f" (if the run was killed while saving, resume from {max(found)[1]!r}, which has it)"


class AdaLoraCallback(TrainerCallback):
    """Run AdaLoRA's rank allocation in ``transformers.Trainer``.

    ``Trainer(model=adalora_model, args=..., callbacks=[AdaLoraCallback()])``:

    - ``on_train_begin``: when the trainable adapter's config has ``total_step=None``, it is set
      to the Trainer's ``max_steps`` (a different explicit value is kept, with a log line).
      When resuming from ``output_dir/checkpoint-<step>``, the allocator state saved there is
      restored, so allocation continues exactly as in an uninterrupted run.
    - ``on_optimizer_step`` (after ``optimizer.step()``, before the gradients are zeroed, once
      per optimizer step whatever ``gradient_accumulation_steps``): calls
      ``update_and_allocate(state.global_step + 1)``. The Trainer increments ``global_step``
      after this event, so the step passed is the number of optimizer steps done, counting this
      one (1 .. max_steps): the final allocation happens at ``total_step - tfinal`` and the run
      ends with exactly ``target_r · n`` triplets kept.
    - ``on_log``: adds ``adalora_budget`` (triplets the schedule allows) and
      ``adalora_total_rank`` (triplets kept now) to the logs.
    - Checkpoints (how ``Trainer`` sees our models): ``Trainer`` treats a model as PEFT's only
      when it is an instance of ``peft.PeftModel``, so for ours it writes
      ``model.state_dict()`` to ``model.safetensors`` and, on ``resume_from_checkpoint`` and
      ``load_best_model_at_end``, loads that file back with ``load_state_dict(strict=False)``.
      Between the end of a step and the start of the next (when the Trainer saves) the
      model's ``state_dict()`` holds the adapter entries only, so that file is small and tied
      embeddings (GPT-2, OPT, T5) never reach safetensors twice; ``on_save`` then adds PEFT's
      files (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``: what
      ``save_pretrained`` writes, loadable by ``peft.PeftModel.from_pretrained``) and the
      allocator state (``adalora_allocator.json`` + ``.safetensors``). This works with and
      without ``peft`` installed. ``trainer.save_model()`` runs no callback: call
      ``model.save_pretrained(output_dir)`` for the adapter files (docs/hf.md).
    """

    def __init__(self) -> None:
        self.budget: int | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Fill in ``total_step``; restore the allocator state when resuming."""
        adalora = find_adalora_model(model)
        name = adalora._trainable()
        cfg = adalora.peft_config[name]
        if cfg.total_step is None:
            adalora.set_total_step(int(state.max_steps))
        elif cfg.total_step != state.max_steps:
            logger.info(
                "AdaLoraCallback: keeping total_step=%d from the config (the Trainer runs %d "
                "optimizer steps).",
                cfg.total_step,
                state.max_steps,
            )
        if state.global_step > 0:
            directory = _checkpoint_dir(args, state)
            if adalora.load_allocator_state(directory):
                self.budget = adalora.rankallocator.budget if adalora.rankallocator else None
            else:
                warnings.warn(
                    f"Resuming at step {state.global_step} without the rank allocator's state "
                    f"(none in {directory!r}): the importance scores restart from zero. Resume "
                    "from a checkpoint written with AdaLoraCallback in the Trainer's callbacks"
                    + _earlier_complete_checkpoint(args, state.global_step)
                    + ".",
                    UserWarning,
                    stacklevel=2,
                )

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Close the checkpoint window: ``state_dict()`` is the full one again."""
        find_adalora_model(model).adapter_only_state_dict = False

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Update importance and allocate; the step is ``state.global_step + 1``."""
        self.budget = find_adalora_model(model).update_and_allocate(state.global_step + 1)

    def _open_checkpoint_window(self, model: Any, control: TrainerControl) -> None:
        # only when the Trainer is about to save (DefaultFlowCallback, which runs first, has
        # decided), and closed again in on_save: a run that stops with an exception in
        # between must not leave model.state_dict() without the base weights
        if control.should_save:
            find_adalora_model(model).adapter_only_state_dict = True

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Open the checkpoint window (the Trainer may save before the next step)."""
        self._open_checkpoint_window(model, control)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Open the checkpoint window (the Trainer may save at the end of an epoch)."""
        self._open_checkpoint_window(model, control)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Close the checkpoint window; after ``load_best_model_at_end`` (the Trainer has put
        the best checkpoint's adapter weights back) restore that checkpoint's allocator state,
        so the rank pattern (which ``save_pretrained`` shrinks by) is the one of those
        weights."""
        adalora = find_adalora_model(model)
        adalora.adapter_only_state_dict = False
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isdir(best):
            adalora.load_allocator_state(best)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write PEFT's adapter files and the allocator state into the checkpoint the Trainer
        just saved."""
        adalora = find_adalora_model(model)
        adalora.adapter_only_state_dict = False  # the checkpoint is written: close the window
        directory = _checkpoint_dir(args, state)
        if state.is_world_process_zero and os.path.isdir(directory):
            adalora.save_pretrained(directory)  # PEFT's files, for PeftModel.from_pretrained
            adalora.save_allocator_state(directory)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the budget and the total kept rank to ``logs`` (and to the last
        ``state.log_history`` entry of this step)."""
        if logs is None or model is None:
            return
        adalora = find_adalora_model(model)
        extra: dict[str, Any] = {"adalora_total_rank": adalora.total_rank()}
        if self.budget is not None:
            extra["adalora_budget"] = self.budget
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
