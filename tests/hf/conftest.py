"""Fixture factories for the adalora_hf tests: tiny transformers models built from configs.

Nothing is downloaded: every model is a random-init model from a config with a fixed seed,
dropout off (so PEFT and adalora see the same computation), a vocabulary of 99 tokens and a
hidden size of 32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

VOCAB = 99


@dataclass
class Tiny:
    """A tiny model family: how to build it, its PEFT task type and a batch for it."""

    kind: str
    task_type: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict[str, torch.Tensor]]


def _ids(seed: int, batch: int = 4, length: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def _cls_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    return {"input_ids": _ids(seed), "labels": torch.randint(0, 2, (4,), generator=g)}


def _lm_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = _ids(seed)
    return {"input_ids": ids, "labels": ids.clone()}


def _s2s_batch(seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(seed), "labels": _ids(seed + 500, length=5)}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


TINY: dict[str, Tiny] = {
    "bert": Tiny("bert", "SEQ_CLS", _bert, _cls_batch),
    "gpt2": Tiny("gpt2", "CAUSAL_LM", _gpt2, _lm_batch),
    "t5": Tiny("t5", "SEQ_2_SEQ_LM", _t5, _s2s_batch),
    "llama": Tiny("llama", "CAUSAL_LM", _llama, _lm_batch),
}


@pytest.fixture
def make_base() -> Callable[..., nn.Module]:
    """``make_base(kind, seed=0)``: a fresh tiny model; equal seeds give equal weights."""

    def make(kind: str, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TINY[kind].build()

    return make


@pytest.fixture
def tiny() -> dict[str, Tiny]:
    """The tiny model families by name."""
    return TINY


@pytest.fixture
def bert_batch() -> dict[str, torch.Tensor]:
    """A classification batch for the tiny BERT."""
    return _cls_batch(0)


def _schedule(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "init_r": 4,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 3,
        "deltaT": 2,
        "total_step": 12,
    }
    kw.update(overrides)
    return kw


@pytest.fixture
def schedule() -> Callable[..., dict[str, Any]]:
    """``schedule(**overrides)``: the short AdaLoRA schedule the tests share (init_r=4 ->
    target_r=2 in 12 steps, tinit=2, tfinal=3, deltaT=2) as AdaLoraConfig keyword arguments."""
    return _schedule
