"""The ``cancer`` task of ``benchmarks/quality.py``: scikit-learn's Wisconsin breast-cancer data
(569 tumours, 30 measurements, malignant or benign) read by a tiny BERT (transformers'
``BertModel``: 4 layers, hidden 32, intermediate 32, so every adapted matrix is square and one
rank costs the same everywhere) as one token per measurement (a learned per-feature vector
scaled by the standardised value, plus a per-feature embedding) after a [CLS] token. It is
pretrained without labels on the training split, by reconstructing 30% masked measurements from
the others; then the backbone is frozen and adapted to the diagnosis with a new head on [CLS]:
AdaLoRA through ``adalora_hf.AdaLoraModel`` (query/key/value/dense), PEFT's LoRA on the same
matrices at the target and the initial rank, and the head alone. The seed draws the stratified
2:1 train/test split, the pretraining and the adaptation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["query", "key", "value", "dense"]


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


def cancer(
    seed: int,
    settings: Any,
    pretrain_steps: int,
    orth_weights: list[float],
    lr_factors: Sequence[float] = (),
) -> list[tuple[str, float, float, int]]:
    """(method, test accuracy, test cross-entropy, final adapter parameters) on one seed; for
    every factor ``k`` in ``lr_factors`` also AdaLoRA without the penalty and LoRA at both
    ranks at ``k`` times ``settings.lr`` (rows suffixed as ``_lm.lr_suffix`` says)."""
    import peft
    from _lm import lr_suffix

    import adalora_hf

    data = cancer_data(seed)
    backbone = pretrain(data, seed, pretrain_steps)
    backbone.requires_grad_(False)
    hidden = backbone.head.in_features
    rows = []

    def adalora(name: str, s: Any) -> None:
        model = fresh(backbone, seed)
        torch.manual_seed(seed)
        ada = adalora_hf.AdaLoraModel(model, s.adalora_config(target_modules=TARGETS))
        model.head.requires_grad_(True)
        acc, loss = adapt(ada, data, seed, s, ada.update_and_allocate)
        rows.append((name, acc, loss, ada.total_rank() * (2 * hidden + 1)))

    for orth in orth_weights:
        adalora(f"AdaLoRA orth={orth}", replace(settings, orth_reg_weight=orth))
    peft_schedule = replace(
        settings, tinit_frac=0.0, tfinal_frac=0.0, deltaT=1, orth_reg_weight=0.0
    )
    adalora("AdaLoRA PEFT schedule", peft_schedule)

    def lora(r: int, s: Any, name: str) -> None:  # PEFT's LoRA
        model = fresh(backbone, seed)
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=r, lora_alpha=s.scale * r, target_modules=TARGETS)
        lora: Any = peft.get_peft_model(model, config)
        model.head.requires_grad_(True)
        acc, loss = adapt(lora, data, seed, s, None)
        params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        rows.append((name, acc, loss, params))

    for r in (settings.target_r, settings.init_r):
        lora(r, settings, f"LoRA r={r}")
    model = fresh(backbone, seed)  # the head alone
    model.head.requires_grad_(True)
    acc, loss = adapt(model, data, seed, settings, None)
    rows.append(("head", acc, loss, 0))
    for k in lr_factors:
        faster = replace(settings, lr=k * settings.lr)
        adalora(f"AdaLoRA orth=0.0{lr_suffix(k)}", replace(faster, orth_reg_weight=0.0))
        for r in (settings.target_r, settings.init_r):
            lora(r, faster, f"LoRA r={r}{lr_suffix(k)}")
    return rows
