"""Fixture factories for the reliability tests: a tiny BERT, a short schedule, a training step,
and snapshots that show a failed call changed nothing (model tensors bitwise, files' bytes and
modification times)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

VOCAB = 50


def tiny_bert(seed: int = 0, hidden: int = 16) -> nn.Module:
    """A random-init 2-layer BERT classifier (dropout off), equal weights for equal seeds."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BertForSequenceClassification(cfg)


def batch(step: int) -> dict[str, torch.Tensor]:
    """The batch of ``step`` (the same on every call and in every process)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (4, 8), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=g)}


def schedule(**overrides: Any) -> dict[str, Any]:
    """AdaLoraConfig keywords: init_r=4 -> target_r=2 on query/value (4 matrices), steps
    1..12: warm-up 1..2, budgeting 3..9, final 10..12."""
    kw: dict[str, Any] = {
        "init_r": 4,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 3,
        "deltaT": 1,
        "total_step": 12,
        "target_modules": ["query", "value"],
        "init_lora_weights": False,
        "task_type": "SEQ_CLS",
        "modules_to_save": ["classifier"],
    }
    kw.update(overrides)
    return kw


def train_steps(model: Any, steps: range, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Run ``steps`` of the documented loop on an AdaLoraModel; returns the optimizer."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in steps:
        model(**batch(step)).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    return optimizer


def tensors_of(model: Any) -> dict[str, torch.Tensor]:
    """Copies of everything that describes ``model``'s state: its state dict and, for an
    AdaLoraModel, its allocator's (EMAs, step, pattern) and its adapters' configs."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    allocator = getattr(model, "rankallocator", None)
    if allocator is not None:
        sd = allocator.state_dict()
        for group in ("ema_sensitivity", "ema_uncertainty"):
            out.update({f"allocator.{group}.{k}": v for k, v in sd.pop(group).items()})
        out["allocator.rest"] = torch.tensor(list(repr(sorted(sd.items())).encode()))
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        text = repr({k: v.to_dict() for k, v in configs.items()}).encode()
        out["peft_config"] = torch.tensor(list(text))
    return out


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert list(after) == list(before), "the set of tensors changed"
    for key, value in before.items():
        other = after[key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert torch.equal(other, value), f"{key} changed"


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: relative path -> (bytes, mtime in ns); directories too."""
    out: dict[str, tuple[bytes, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root)) + "/"] = (b"", path.stat().st_mtime_ns)
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def backward(model: Any, step: int) -> None:
    """Forward and backward of ``step``'s batch (gradients set, no optimizer step)."""
    model.train()
    model(**batch(step)).loss.backward()


@pytest.fixture(scope="session")
def rel() -> SimpleNamespace:
    """The helpers of this module (test modules cannot import a conftest): ``tiny_bert``,
    ``batch``, ``schedule``, ``train_steps``, ``backward``, ``tensors_of``, ``assert_same_tensors``,
    ``files_of``."""
    return SimpleNamespace(
        tiny_bert=tiny_bert,
        batch=batch,
        schedule=schedule,
        train_steps=train_steps,
        backward=backward,
        tensors_of=tensors_of,
        assert_same_tensors=assert_same_tensors,
        files_of=files_of,
    )
