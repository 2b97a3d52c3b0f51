"""Worker processes for the reliability tests (run as a script, killed with SIGKILL by them).

``python rel_worker.py train OUT --loop custom|trainer [--stall-at S] [--resume PATH]``
trains the tiny BERT of conftest.py with AdaLoRA (steps 1..12: warm-up 1..2, budgeting 3..9,
final 10..12), deterministically (one thread, ``torch.use_deterministic_algorithms``), writing a
checkpoint every 2 steps: in the custom loop ``OUT/ckpt-<step>.pt`` (adapter, optimizer,
allocator state and step, replaced atomically, as docs/errors.md shows), with the Trainer its
``checkpoint-<step>`` directories (``AdaLoraCallback`` adds the allocator state). ``--stall-at``
blocks after that step (so a test can kill the process during the run); ``--resume`` continues
from a checkpoint. At the end it writes ``OUT/final.safetensors`` (every adapter tensor, full
rank) and ``OUT/final.json`` (rank pattern, allocator step, skipped steps).

``python rel_worker.py save-kill OUT --hang-at N [--with-readme]`` saves an adapter to
``OUT/adapter`` (a copy goes to ``OUT/v1``), trains on, and saves again; the N-th file write of
that second save stops half-way and hangs (after creating ``OUT/HALF-WRITTEN``), for the test
to kill the process there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import batch, schedule, tiny_bert, train_steps

from adalora_hf import AdaLoraCallback, AdaLoraConfig, AdaLoraModel, get_peft_model

TOTAL_STEP = 12
EVERY = 2


def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.simplefilter("ignore")


def _stall(step: int, stall_at: int | None) -> None:
    if step == stall_at:
        print(f"STALLED {step}", flush=True)
        while True:
            time.sleep(0.05)


# -- the custom loop, with the checkpoint functions of docs/errors.md ----------------------------
def save_checkpoint(path: str, model: AdaLoraModel, optimizer: Any, step: int) -> None:
    adapter = {k: v for k, v in model.state_dict().items() if k in model.adapter_state_keys()}
    state = {
        "adapter": adapter,
        "optimizer": optimizer.state_dict(),
        "allocator": model.rankallocator.state_dict(),
        "step": step,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the previous checkpoint


def load_checkpoint(path: str, model: AdaLoraModel, optimizer: Any) -> int:
    state = torch.load(path, weights_only=True)  # tensors and plain values only, no pickle
    model.load_state_dict(state["adapter"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    model.rankallocator.load_state_dict(state["allocator"])
    return int(state["step"]) + 1  # the next step to run


def _custom(out: Path, stall_at: int | None, resume: str | None) -> AdaLoraModel:
    model = AdaLoraModel(tiny_bert(), AdaLoraConfig(**schedule(total_step=TOTAL_STEP)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    start = load_checkpoint(resume, model, optimizer) if resume else 1
    for step in range(start, TOTAL_STEP + 1):
        train_steps(model, range(step, step + 1), optimizer)
        if step % EVERY == 0:
            save_checkpoint(str(out / f"ckpt-{step:04d}.pt"), model, optimizer, step)
        _stall(step, stall_at)
    return model


# -- the Trainer ----------------------------------------------------------------------------------
def _trainer(out: Path, stall_at: int | None, resume: str | None) -> AdaLoraModel:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Stall(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _stall(state.global_step, stall_at)

    model = get_peft_model(tiny_bert(), AdaLoraConfig(**schedule(total_step=None)))
    data = [{k: v[i] for k, v in batch(step).items()} for step in range(12) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=TOTAL_STEP,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        save_strategy="steps",
        save_steps=EVERY,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        full_determinism=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback(), Stall()]
    )
    trainer.train(resume_from_checkpoint=resume)
    return model.base_model


def _train(out: Path, loop: str, stall_at: int | None, resume: str | None) -> None:
    from safetensors.torch import save_file

    _deterministic()
    model = (_custom if loop == "custom" else _trainer)(out, stall_at, resume)
    keys = model.adapter_state_keys()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k in keys}
    save_file(tensors, str(out / "final.safetensors"))
    allocator = model.rankallocator
    assert allocator is not None
    record = {
        "rank_pattern": model.rank_pattern,
        "step": allocator.step,
        "skipped": allocator.skipped_steps,
    }
    (out / "final.json").write_text(json.dumps(record))


# -- a save killed half-way ----------------------------------------------------------------------
def _save_kill(out: Path, hang_at: int, with_readme: bool) -> None:
    import adalora_hf._io as io_

    _deterministic()
    model = AdaLoraModel(tiny_bert(), AdaLoraConfig(**schedule()))
    optimizer = train_steps(model, range(1, 6))
    target = out / "adapter"
    if with_readme:
        target.mkdir()
        (target / "README.md").write_text("my notes\n")
    model.save_pretrained(target)
    shutil.copytree(target, out / "v1")
    train_steps(model, range(6, 13), optimizer)  # another rank pattern, other weights
    writes = 0
    real = io_._write_synced

    def hang_half_way(path: str, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes < hang_at:
            return real(path, data)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        (out / "HALF-WRITTEN").write_text(path)  # the test kills the process now
        while True:
            time.sleep(0.05)

    io_._write_synced = hang_half_way  # type: ignore[assignment]
    model.save_pretrained(target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train", "save-kill"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--loop", choices=["custom", "trainer"], default="custom")
    parser.add_argument("--stall-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--hang-at", type=int, default=1)
    parser.add_argument("--with-readme", action="store_true")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.command == "train":
        _train(a.out, a.loop, a.stall_at, a.resume)
    else:
        _save_kill(a.out, a.hang_at, a.with_readme)


if __name__ == "__main__":
    main()
