"""Worker: ``transformers.Trainer`` + ``AdaLoraCallback`` on a tiny BERT, under DDP (gloo), then
``AdaLoraModel.save_pretrained`` from every rank.

Launched by tests/hf/test_distributed_trainer.py with ``python -m torch.distributed.run
--nproc_per_node 2 hf_trainer.py OUT``; the Trainer (accelerate) wraps the model in
``DistributedDataParallel`` itself. Each rank writes ``OUT/rank<k>.json`` (the rank pattern
after every optimizer step, the kept rank per matrix at the end, the budgets) and calls
``save_pretrained(OUT/saved_by_rank<k>)``: only rank 0 may write. ``run(OUT, world=1)`` is the
single-process reference, with the whole global batch per step.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import finish, write_json
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from adalora_hf import AdaLoraCallback, AdaLoraConfig, AdaLoraModel
from adalora_torch import SVDAdapter

MAX_STEPS = 12
PER_DEVICE = 4  # two processes x 4 = the single process's 8
VOCAB = 99


class Data(Dataset):
    def __init__(self, n: int = 8 * MAX_STEPS) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


class SequentialTrainer(Trainer):
    """Samples in order, so that the two ranks' micro-batches of a step (accelerate hands
    rank k the batches k, k + 2, ...) concatenate to the single process's batch."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


class Recorder(TrainerCallback):
    """The rank pattern (PEFT's form) after every optimizer step (runs after AdaLoraCallback)."""

    def __init__(self, adalora: AdaLoraModel) -> None:
        self.adalora = adalora
        self.patterns: dict[str, Any] = {}

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        pattern = self.adalora.rank_pattern
        if pattern is not None:
            self.patterns[str(state.global_step)] = pattern


def build() -> AdaLoraModel:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=37,
                vocab_size=VOCAB,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, lora_alpha=8, task_type="SEQ_CLS"
    )  # total_step None: AdaLoraCallback takes max_steps
    # float64: one and two processes round differently; no mask may depend on it
    return AdaLoraModel(base, config).double()


def run(out: Path, world: int) -> dict[str, Any]:
    model = build()
    recorder = Recorder(model)
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=PER_DEVICE * (2 // world),
        learning_rate=1e-2,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        # the mean over the global batch, as one process computes it (by default the Trainer
        # multiplies the loss by the number of processes for models with **kwargs in forward,
        # and BERT's classification loss does not divide it back)
        average_tokens_across_devices=False,
    )
    rank = args.process_index  # the Trainer's arguments start the process group
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=Data(), callbacks=[AdaLoraCallback(), recorder]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    model.save_pretrained(out / f"saved_by_rank{rank}")
    kept = {
        name: int(torch.count_nonzero(m.lora_E["default"]))
        for name, m in model.model.named_modules()
        if isinstance(m, SVDAdapter)
    }
    allocator = model.rankallocator
    assert allocator is not None
    return {
        "patterns": recorder.patterns,
        "kept": kept,
        "target_budget": allocator.target_budget,
        "finalized": allocator.finalized,
        "total_step": model.peft_config["default"].total_step,
        "wrapped": type(trainer.model_wrapped).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = run(args.out, int(os.environ["WORLD_SIZE"]))
    write_json(args.out / f"rank{dist.get_rank()}.json", record)
    finish()


if __name__ == "__main__":
    main()
