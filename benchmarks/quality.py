"""Accuracy of AdaLoRA against LoRA at the same final number of adapter parameters.

Two pretrain-then-adapt tasks on data that ships with scikit-learn (nothing is downloaded),
each over several seeds; the table gives the mean, the standard deviation and every run.

1. ``digits``: the demo's task (``adalora_hf.cli._demo.run_demo``): a tiny ViT pretrained on
   scikit-learn's handwritten digits 0-4, adapted to 5-9 with a new head: AdaLoRA (init_r 8 ->
   target_r 4), LoRA at rank 4, and the head alone.
2. ``cancer``: scikit-learn's Wisconsin breast-cancer data (569 tumours, 30 measurements,
   malignant or benign). A tiny BERT (transformers' ``BertModel``: 4 layers, hidden 32,
   intermediate 32, so every adapted matrix is square and one rank costs the same everywhere)
   reads each measurement as a token (a learned per-feature vector scaled by the standardised
   value, plus a per-feature embedding) after a [CLS] token. It is pretrained without labels on
   the training split, by reconstructing 30% masked measurements from the others; then the
   backbone is frozen and adapted to the diagnosis with a new head on [CLS]: AdaLoRA through
   ``adalora_hf.AdaLoraModel`` (query/key/value/dense, init_r 8 -> target_r 4), PEFT's LoRA at
   rank 4 on the same matrices, and the head alone. The seed draws the stratified 2:1
   train/test split, the pretraining and the adaptation.

Both adapters scale their update by 2 (LoRA ``alpha / r``, AdaLoRA ``lora_alpha / init_r``),
train with AdamW (lr 1e-2, linear decay, 300 steps of 32) together with the head, and AdaLoRA
has 30 warm-up and 60 final steps, allocation every 10, ``orth_reg_weight`` 0.5 (the demo's
``DemoSettings``). LoRA has ``r·(in + out)`` parameters per matrix, AdaLoRA ``(in + out + 1)``
per kept triplet: the same final count within 1/(in + out).

    python benchmarks/quality.py                       # both tasks, seeds 0 1 2, CPU
    python benchmarks/quality.py --tasks cancer --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["query", "key", "value", "dense"]


@dataclass
class Run:
    task: str
    method: str
    seed: int
    accuracy: float
    test_loss: float  # cross-entropy on the test set (nan where the task does not report it)
    adapter_params: int  # at the end (AdaLoRA: after pruning)


# -- task 1: the demo's digits --------------------------------------------------------------


def digits(seed: int, settings: Any) -> list[Run]:
    from adalora_hf.cli._demo import run_demo

    with tempfile.TemporaryDirectory() as out:
        result = run_demo(
            settings=settings,
            seed=seed,
            out=Path(out),
            device="cpu",
            progress=False,
            log=lambda _: None,
        )
    return [
        Run("digits", r.method, seed, r.accuracy, math.nan, r.adapter_params) for r in result.rows
    ]


# -- task 2: breast cancer, a feature-token BERT --------------------------------------------


class TabularBert(nn.Module):
    """[CLS] + one token per feature -> ``BertModel`` -> a head on [CLS] (and, for
    pretraining, a reconstruction of each feature's value from its token)."""

    def __init__(self, n_features: int, hidden: int, layers: int, heads: int) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        self.value = nn.Parameter(torch.randn(n_features, hidden) * 0.02)  # per-feature vector
        self.embed = nn.Parameter(torch.randn(n_features, hidden) * 0.02)  # which feature
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        config = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=hidden,  # square matrices only
            vocab_size=2,  # unused: inputs_embeds
            max_position_embeddings=n_features + 1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.reconstruct = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, 2)

    def hidden(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = features.unsqueeze(-1) * self.value + self.embed  # (batch, n_features, hidden)
        if mask is not None:  # masked feature: its identity, not its value
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token + self.embed, tokens)
        cls = self.cls.expand(len(features), -1, -1)
        out = self.encoder(inputs_embeds=torch.cat([cls, tokens], dim=1))
        return out.last_hidden_state  # (batch, 1 + n_features, hidden)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.hidden(features)[:, 0])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def cancer_data(seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1 / 3, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8  # standardise with the training split only
    return {
        "x_train": torch.tensor((x_tr - mean) / std, dtype=torch.float32),
        "x_test": torch.tensor((x_te - mean) / std, dtype=torch.float32),
        "y_train": torch.tensor(y_tr, dtype=torch.int64),
        "y_test": torch.tensor(y_te, dtype=torch.int64),
    }


def pretrain(data: dict[str, torch.Tensor], seed: int, steps: int) -> TabularBert:
    """Masked-feature reconstruction on the training split's measurements (no labels)."""
    torch.manual_seed(seed)
    x = data["x_train"]
    model = TabularBert(x.shape[1], hidden=32, layers=4, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (64,), generator=g)]
        mask = torch.rand(batch.shape, generator=g) < 0.3
        pred = model.reconstruct(model.hidden(batch, mask)[:, 1:]).squeeze(-1)
        loss = F.mse_loss(pred[mask], batch[mask])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model


def adapt(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    seed: int,
    settings: Any,
    after_step: Callable[[int], Any] | None,
) -> tuple[float, float]:
    """Train what requires grad (adapter + head); returns test accuracy and cross-entropy."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / settings.steps)
    x, y = data["x_train"], data["y_train"]
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(1, settings.steps + 1):
        idx = torch.randint(0, len(y), (settings.batch_size,), generator=g)
        model(features=x[idx], labels=y[idx]).loss.backward()  # AdaLoRA: + orth penalty
        optimizer.step()
        decay.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(features=data["x_test"]).logits
    accuracy = float((logits.argmax(-1) == data["y_test"]).float().mean())
    return accuracy, float(F.cross_entropy(logits, data["y_test"]))


def fresh(backbone: TabularBert, seed: int) -> TabularBert:
    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, 2)  # a new head for the new task
    return model


def cancer(seed: int, settings: Any, pretrain_steps: int) -> list[Run]:
    import peft

    import adalora_hf

    data = cancer_data(seed)
    backbone = pretrain(data, seed, pretrain_steps)
    backbone.requires_grad_(False)
    runs = []

    def count(model: nn.Module, kinds: tuple[str, ...]) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in kinds))

    # AdaLoRA
    model = fresh(backbone, seed)
    config = settings.adalora_config(target_modules=TARGETS)
    torch.manual_seed(seed)
    ada = adalora_hf.AdaLoraModel(model, config)
    model.head.requires_grad_(True)
    acc, loss = adapt(ada, data, seed, settings, ada.update_and_allocate)
    kept = ada.total_rank()
    n = sum(1 for _ in ada.rankallocator.module_names) if ada.rankallocator else 0
    hidden = model.head.in_features
    runs.append(Run("cancer", "AdaLoRA", seed, acc, loss, kept * (2 * hidden + 1)))
    assert kept == settings.target_r * n

    # LoRA at rank target_r, PEFT's
    model = fresh(backbone, seed)
    torch.manual_seed(seed)
    lora_config = peft.LoraConfig(
        r=settings.target_r,
        lora_alpha=settings.scale * settings.target_r,
        target_modules=TARGETS,
    )
    lora: Any = peft.get_peft_model(model, lora_config)
    model.head.requires_grad_(True)
    acc, loss = adapt(lora, data, seed, settings, None)
    runs.append(Run("cancer", "LoRA", seed, acc, loss, count(lora, ("lora_A", "lora_B"))))

    # the head alone
    model = fresh(backbone, seed)
    model.head.requires_grad_(True)
    acc, loss = adapt(model, data, seed, settings, None)
    runs.append(Run("cancer", "head", seed, acc, loss, 0))
    return runs


# -- the table --------------------------------------------------------------------------------


def summary(runs: list[Run]) -> list[str]:
    header = (
        f"{'task':<8}{'method':<9}{'accuracy mean ± sd':>20}{'test CE mean ± sd':>20}"
        f"{'adapter params':>16}   accuracy per seed"
    )
    lines = [header, "-" * (len(header) + 12)]
    keys = list(dict.fromkeys((r.task, r.method) for r in runs))
    for task, method in keys:
        rs = [r for r in runs if (r.task, r.method) == (task, method)]
        acc = [r.accuracy for r in rs]
        ce = [r.test_loss for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ce_text = "-"
        if not any(math.isnan(c) for c in ce):
            ce_sd = statistics.stdev(ce) if len(ce) > 1 else 0.0
            ce_text = f"{statistics.mean(ce):.4f} ± {ce_sd:.4f}"
        per_seed = " ".join(f"{a:.4f}" for a in acc)
        lines.append(
            f"{task:<8}{method:<9}{statistics.mean(acc):>11.4f} ± {sd:.4f}{ce_text:>20}"
            f"{rs[-1].adapter_params:>16,}   {per_seed}"
        )
    for task in dict.fromkeys(r.task for r in runs):  # seed by seed: the same split and batches
        by_seed = {(r.method, r.seed): r.accuracy for r in runs if r.task == task}
        diffs = [
            by_seed["AdaLoRA", seed] - by_seed["LoRA", seed]
            for method, seed in by_seed
            if method == "AdaLoRA"
        ]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(
            f"{task}: AdaLoRA - LoRA accuracy, paired by seed: {statistics.mean(diffs):+.4f} ± "
            f"{sd:.4f} ({' '.join(f'{d:+.4f}' for d in diffs)})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "cancer"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps")
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="cancer: pretraining")
    args = parser.parse_args()
    from adalora_hf.cli._runs import DemoSettings

    torch.set_num_threads(1)  # tiny matrices; also makes the sums, hence the numbers, portable
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the backbone's "Loading weights" bar, once per seed
    settings = DemoSettings(steps=args.steps)
    runs: list[Run] = []
    start = time.perf_counter()
    for task in args.tasks:
        for seed in args.seeds:
            if task == "digits":
                runs += digits(seed, settings)
            elif task == "cancer":
                runs += cancer(seed, settings, args.pretrain_steps)
            else:
                raise SystemExit(f"unknown task {task!r}: digits or cancer")
            print(f"{task} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(
        f"\n{len(args.seeds)} seeds; {settings.steps} adaptation steps; AdaLoRA init_r "
        f"{settings.init_r} -> target_r {settings.target_r}, LoRA r {settings.target_r}"
    )
    print("\n".join(summary(runs)))


if __name__ == "__main__":
    main()
