"""Default target modules per model type: PEFT's AdaLoRA table (peft 0.21.2's
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING), and each listed family adapts."""

from __future__ import annotations

import warnings
from typing import Any

import peft
import pytest
import torch
from packaging.version import Version
from peft.utils import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as PEFT_TABLE
from transformers import AutoConfig, AutoModel

from adalora_hf import DEFAULT_TARGET_MODULES, AdaLoraConfig, AdaLoraModel, default_target_modules
from adalora_torch import SVDAdapter

OLD_PEFT = Version(peft.__version__) < Version("0.21")


_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
_DECODER = dict(_ENCODER, num_key_value_heads=2)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "deberta-v2": _ENCODER,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
    "bart": dict(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
    ),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=37,
        word_embed_proj_dim=32,
    ),
    "vit": dict(_ENCODER, image_size=8, patch_size=4),
}


def test_table_agrees_with_peft_where_peft_has_an_entry() -> None:
    for model_type, targets in PEFT_TABLE.items():
        assert DEFAULT_TARGET_MODULES[model_type] == targets, model_type
    extra = set(DEFAULT_TARGET_MODULES) - set(PEFT_TABLE)
    if OLD_PEFT:  # older PEFT lacks entries that 0.21 has (e.g. gemma4)
        assert {"mistral", "mixtral", "vit"} <= extra
    else:
        assert extra == {"mistral", "mixtral", "vit"}


def test_unknown_model_type_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"set\s+AdaLoraConfig\(target_modules="):
        default_target_modules("my-model")


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_default_targets_adapt_each_family(model_type: str) -> None:
    kwargs = dict(TINY_CONFIGS[model_type])
    if model_type != "vit":
        kwargs["vocab_size"] = 99
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
    model = AdaLoraModel(base, AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    targets = default_target_modules(model_type)
    adapted = [n for n, m in model.model.named_modules() if isinstance(m, SVDAdapter)]
    assert adapted
    names = {n.split(".")[-1] for n in adapted}
    assert names <= set(targets)
    if model_type != "vit":  # ViT's entry holds transformers 4 and 5 names, one pair matches
        assert names == set(targets)
    assert model.peft_config["default"].target_modules == targets
