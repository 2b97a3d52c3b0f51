"""Default ``target_modules`` per transformers ``model_type`` when the config gives none.

The entries are PEFT's ``TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`` (peft 0.21),
plus ``mistral``, ``mixtral`` and ``vit``, which PEFT's AdaLoRA table lacks (PEFT then asks for
``target_modules``); for those the attention query/value projections are used, as in PEFT's
LoRA table (ViT's are ``query``/``value`` in transformers 4 and ``q_proj``/``v_proj`` in 5; the
entry lists both). The resolved list is written into the saved config, so PEFT loads such
adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DEFAULT_TARGET_MODULES", "default_target_modules"]

DEFAULT_TARGET_MODULES: Mapping[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # not in PEFT's AdaLoRA table (PEFT's LoRA defaults):
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "vit": ["query", "value", "q_proj", "v_proj"],  # transformers 4 names, then 5 names
}


def default_target_modules(model_type: str | None) -> list[str] | str:
    """The default ``target_modules`` for a transformers ``model_type`` (a fresh list).

    Raises ``ValueError`` naming the fix when the model type has no default.

    >>> default_target_modules("bert")
    ['query', 'value']
    """
    if model_type is None or model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default target_modules for model_type={model_type!r}: set "
            "AdaLoraConfig(target_modules=[...]) to the names of the linear layers to adapt "
            "(e.g. ['q_proj', 'v_proj']) or to a regex. Known model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}."
        )
    value = DEFAULT_TARGET_MODULES[model_type]
    return value if isinstance(value, str) else list(value)
