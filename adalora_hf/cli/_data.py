"""The demo's data: scikit-learn's digits split into a pretraining and an adaptation task,
seeded random batches over a split, accuracy and cross-entropy on a split, and the progress bar
over batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "NUM_CLASSES", "Split", "accuracy", "batches", "cross_entropy", "digits", "progress_bar",
]  # fmt: skip

NUM_CLASSES = 5  # digits 0-4 for pretraining, 5-9 (relabelled 0-4) for adaptation


@dataclass
class Split:
    """Images and labels of one split, on the device they are used on."""

    x: torch.Tensor  # (n, 1, 8, 8), float32 in [0, 1]
    y: torch.Tensor  # (n,), int64 in [0, 5)


def digits(device: torch.device, seed: int, test_size: float) -> dict[str, Split]:
    """Digits 0-4 (pretraining: train / held-out) and 5-9 (adaptation: train / test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[:, None]  # (1797, 1, 8, 8)
    y = data.target
    old, new = y < NUM_CLASSES, y >= NUM_CLASSES
    # the pretraining split is part of the recipe (seed 0), the adaptation split follows --seed
    po_x, pt_x, po_y, pt_y = train_test_split(
        x[old], y[old], test_size=0.2, stratify=y[old], random_state=0
    )
    ao_x, at_x, ao_y, at_y = train_test_split(
        x[new], y[new] - NUM_CLASSES, test_size=test_size, stratify=y[new], random_state=seed
    )

    def split(a: Any, b: Any) -> Split:
        return Split(torch.tensor(a, device=device), torch.tensor(b, device=device))

    return {
        "pretrain": split(po_x, po_y),
        "pretrain_test": split(pt_x, pt_y),
        "train": split(ao_x, ao_y),
        "test": split(at_x, at_y),
    }


def batches(data: Split, batch_size: int, steps: int, seed: int) -> Iterator[Split]:
    """``steps`` batches of ``batch_size`` examples drawn with replacement, seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.y), (batch_size,), generator=generator)
        idx = idx.to(data.y.device)
        yield Split(data.x[idx], data.y[idx])


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    """The share of ``data`` that ``model`` (in eval mode) classifies right."""
    was_training = model.training
    model.eval()
    logits = model(pixel_values=data.x).logits
    model.train(was_training)
    return float((logits.argmax(-1) == data.y).float().mean())


@torch.no_grad()
def cross_entropy(model: nn.Module, data: Split) -> float:
    """Mean cross-entropy (nats) of ``model`` (in eval mode) on ``data``: the demo's
    continuous metric, lower is better."""
    was_training = model.training
    model.eval()
    logits = model(pixel_values=data.x).logits
    model.train(was_training)
    return float(torch.nn.functional.cross_entropy(logits, data.y))


def progress_bar(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    """``iterable`` with a tqdm bar when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    # disable=None hides the bar when stderr is not a terminal (logs, CI)
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if enabled else True)
