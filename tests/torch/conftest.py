"""Fixture factories for the torch tests: tiny models and layers, built in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from adalora_torch import SVDConv2d, SVDEmbedding, SVDLinear


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.v(torch.tanh(self.q(h))))


class TinyNet(nn.Module):
    """embed -> n blocks (q, v, norm) -> head; module names like ``layers.1.q``."""

    def __init__(self, d: int = 8, n_layers: int = 3, vocab: int = 13, n_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (batch, seq, d)
        for block in self.layers:
            h = block(h)
        return self.head(h)  # (batch, seq, n_out)


@pytest.fixture
def make_model() -> Callable[..., TinyNet]:
    """``make_model(seed=0, **sizes)``: a fresh TinyNet with seeded weights."""

    def make(seed: int = 0, **kwargs: int) -> TinyNet:
        torch.manual_seed(seed)
        return TinyNet(**kwargs)

    return make


@pytest.fixture
def make_ids() -> Callable[..., torch.Tensor]:
    """``make_ids(seed=1, batch=2, seq=5, vocab=13)``: token ids for TinyNet."""

    def make(seed: int = 1, batch: int = 2, seq: int = 5, vocab: int = 13) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, seq), generator=g)

    return make


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)  # weight (n_in, n_out)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


def _base(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(6, 5)
    if kind == "conv1d":
        return _conv1d(6, 5)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2)
    if kind == "embedding":
        return nn.Embedding(10, 5)
    raise ValueError(kind)


def _input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind in ("linear", "conv1d"):
        return torch.randn(2, 3, 6, generator=g)
    if kind == "conv2d":
        return torch.randn(2, 3, 7, 7, generator=g)
    return torch.randint(0, 10, (2, 4), generator=g)


def _wrap(base: nn.Module, kind: str, **kwargs: object) -> nn.Module:
    cls = {"linear": SVDLinear, "conv1d": SVDLinear, "conv2d": SVDConv2d}.get(kind, SVDEmbedding)
    if kind == "conv1d":
        kwargs.setdefault("fan_in_fan_out", True)
    rank = kwargs.pop("rank", 4)
    alpha = kwargs.pop("alpha", 8.0)
    return cls(base, rank, alpha, **kwargs)


@pytest.fixture
def make_base() -> Callable[[str], nn.Module]:
    """``make_base(kind)``: a small base layer, kind in linear | conv1d | conv2d | embedding."""
    return _base


@pytest.fixture
def make_layer() -> Callable[..., tuple[nn.Module, torch.Tensor]]:
    """``make_layer(kind, seed=0, e_std=1.0, **layer_kwargs)`` -> (SVD layer, input).

    Defaults: rank 4, alpha 8, ``init_weights=False``; E is redrawn with ``e_std`` (unless
    None) so the update is well above rounding."""

    def make(
        kind: str, seed: int = 0, e_std: float | None = 1.0, **kwargs: object
    ) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        kwargs.setdefault("init_weights", False)
        layer = _wrap(_base(kind), kind, **kwargs)
        if e_std is not None:
            with torch.no_grad():
                for e in layer.lora_E.values():
                    e.normal_(0.0, e_std)
        return layer, _input(kind, seed + 1)

    return make
