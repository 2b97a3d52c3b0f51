"""AdaLoRA on transformers models loaded in 8-bit and 4-bit (bitsandbytes, on the CPU), side by
side with peft 0.21.2's ``SVDLinear8bitLt`` / ``SVDLinear4bit``.

Tiny OPT and LLaMA models (hidden size 64: bitsandbytes' CPU 4-bit kernels need whole blocks of
64) are saved once to a temporary folder and loaded with ``from_pretrained(path,
quantization_config=...)``, as a user would. PEFT's adapter values (E set to N(0, 1) so the
adapters change the output from the first step) are copied into ours before training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

import peft  # noqa: E402
import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from adalora_hf import (  # noqa: E402
    AdaLoraConfig,
    AdaLoraModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from adalora_torch import SVDLinear4bit, SVDLinear8bitLt  # noqa: E402
from adalora_torch._bnb import dequantize_weight  # noqa: E402

STEPS = 12
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)
SCHEDULE = dict(init_r=4, target_r=2, total_step=STEPS, tinit=2, tfinal=3, deltaT=2)
TARGETS = ["q_proj", "v_proj"]
QUANT = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
}
SVD_CLASS = {"8bit": SVDLinear8bitLt, "4bit": SVDLinear4bit}
# the oracle is PEFT 0.21's bitsandbytes layers: PEFT 0.17's 4-bit logits differ by up to 3e-4
OLD_PEFT_4BIT = pytest.mark.skipif(
    Version(peft.__version__) < Version("0.21"), reason="the oracle is PEFT 0.21's 4-bit layers"
)
BNB_CLASS = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = {}
    for kind, build in (("opt", _opt), ("llama", _llama)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        build().save_pretrained(path)
        paths[kind] = path
    return paths


@pytest.fixture
def load(saved: dict[str, Path]) -> Callable[..., nn.Module]:
    def load(kind: str, quant: str | None, dtype: torch.dtype = torch.float32) -> nn.Module:
        config = None if quant is None else QUANT[quant]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                saved[kind], quantization_config=config, dtype=dtype
            )
        # On CPUs with AVX512-BF16, bitsandbytes runs 4-bit layers in eval mode without gradients
        # through a kernel that rounds activations to bfloat16; a 1e-7 difference upstream then
        # flips roundings and moves the logits by ~1e-4. The oracle comparisons need the float32
        # path that every other CPU takes.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return model

    return load


def _batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 99, (4, 8), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids.clone()}


def _config(cls: Any, **overrides: Any) -> Any:
    kw: dict[str, Any] = dict(SCHEDULE, target_modules=TARGETS, lora_dropout=0.0)
    kw.update(task_type="CAUSAL_LM", **overrides)
    return cls(**kw)


def _peft(model: nn.Module, **overrides: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, _config(peft.AdaLoraConfig, **overrides))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_E." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return theirs


def _copy_adapters(theirs: nn.Module, ours: nn.Module) -> None:
    adapters = {k: v for k, v in theirs.state_dict().items() if ".lora_" in k}
    result = ours.load_state_dict(adapters, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k]


def _trainable(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _train(model: nn.Module, step_hook: Callable[[int], object]) -> list[torch.Tensor]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        loss = model(**_batch(step)).loss
        loss.backward()
        opt.step()
        step_hook(step)
        opt.zero_grad()
        losses.append(loss.detach())
    model.eval()
    return losses


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_batch(99)["input_ids"]).logits


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_training_on_a_quantized_base_matches_peft(kind, quant, load) -> None:
    theirs = _peft(load(kind, quant))
    ours = get_peft_model(load(kind, quant), _config(AdaLoraConfig))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj if kind == "llama" else None
    layer = layer or ours.base_model.model.model.decoder.layers[0].self_attn.q_proj
    assert type(layer) is SVD_CLASS[quant]
    assert _trainable(ours) == _trainable(theirs)
    # the same count as on the full-precision base (4-bit once counted the packed weight)
    full = get_peft_model(load(kind, None), _config(AdaLoraConfig))
    assert ours.get_nb_trainable_parameters()[0] == full.get_nb_trainable_parameters()[0]
    _copy_adapters(theirs, ours)

    theirs.train()
    ours.train()
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        losses = []
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            loss = model(**_batch(step)).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], **LOSS_TOL, msg=f"loss at step {step}")
        pattern = ours.peft_config["default"].rank_pattern
        assert pattern == theirs.peft_config["default"].rank_pattern, f"step {step}"
    assert sum(map(sum, pattern.values())) == SCHEDULE["target_r"] * len(pattern)


# Logits of the merged model against the adapter model (a tiny LM whose logits reach ~1; the
# adapter moves them by ~0.5): the requantized weight differs from W + ΔW by up to half a grid
# step per entry; measured 0.013 (8-bit) and 0.079 (4-bit), docs/quantized.md
MERGE_TOL = {"8bit": 0.03, "4bit": 0.15}


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_merge_unmerge_and_merge_and_unload_requantize(quant, load) -> None:
    ours = get_peft_model(load("opt", quant), _config(AdaLoraConfig, init_lora_weights=False))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.mul_(50.0 if "lora_E" in name else 5.0)
    ours.eval()
    adapted = _logits(ours)
    layer = ours.base_model.model.model.decoder.layers[0].self_attn.q_proj
    storage = layer.weight.dtype
    assert not storage.is_floating_point
    original = dequantize_weight(layer.base_layer)
    with ours.disable_adapter():
        plain = _logits(ours)
    effect = (adapted - plain).abs().max()

    ours.base_model.merge(safe_merge=True)
    assert layer.merged and layer.weight.dtype == storage
    error = (_logits(ours) - adapted).abs().max()
    assert error <= MERGE_TOL[quant] and effect > 3 * error  # the adapter is merged
    largest = dequantize_weight(layer.base_layer).abs().amax()
    ours.base_model.unmerge()
    assert not layer.merged
    restored = dequantize_weight(layer.base_layer)
    # two roundings (merge, unmerge), each at most half a grid step of the merged weight's
    # scale: 1/127 of the row's absmax (int8), 0.14 of the block's absmax (NF4's widest gap)
    step = largest * (1.01 / 127 if quant == "8bit" else 0.28)
    assert (restored - original).abs().max() <= step
    torch.testing.assert_close(_logits(ours), adapted, atol=MERGE_TOL[quant], rtol=0)

    merged = ours.merge_and_unload()
    q_proj = merged.model.decoder.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == BNB_CLASS[quant] and q_proj.weight.dtype == storage
    torch.testing.assert_close(_logits(merged), adapted, atol=MERGE_TOL[quant], rtol=0)


@OLD_PEFT_4BIT
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_adapter_trained_on_a_quantized_base_loads_in_peft_and_on_full_precision(
    quant, load, tmp_path
) -> None:
    ours = get_peft_model(load("opt", quant), _config(AdaLoraConfig, init_lora_weights=False))
    _train(ours, ours.base_model.update_and_allocate)
    ours.save_pretrained(tmp_path)
    expected = _logits(ours)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load("opt", quant), str(tmp_path))
        theirs_full = peft.PeftModel.from_pretrained(load("opt", None), str(tmp_path))
    torch.testing.assert_close(_logits(theirs), expected, **LOGIT_TOL)
    ours_full = AdaLoraModel.from_pretrained(load("opt", None), tmp_path)
    torch.testing.assert_close(_logits(ours_full), _logits(theirs_full), **LOGIT_TOL)
    # the full-precision base differs from the quantized one by the quantization error only
    torch.testing.assert_close(_logits(ours_full), expected, atol=MERGE_TOL[quant], rtol=0)


@OLD_PEFT_4BIT
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_adapter_trained_by_peft_on_full_precision_loads_here_on_a_quantized_base(
    quant, load, tmp_path
) -> None:
    theirs = _peft(load("opt", None), init_lora_weights=False)
    _train(theirs, theirs.base_model.update_and_allocate)
    theirs.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_q = peft.PeftModel.from_pretrained(load("opt", quant), str(tmp_path))
    ours_q = AdaLoraModel.from_pretrained(load("opt", quant), tmp_path)
    layer = ours_q.model.model.decoder.layers[0].self_attn.q_proj
    assert type(layer) is SVD_CLASS[quant]
    torch.testing.assert_close(_logits(ours_q), _logits(theirs_q), **LOGIT_TOL)


def _checkpointing(model: nn.Module) -> bool:
    # transformers >= 5 renamed it (the old name warns)
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


@pytest.mark.parametrize("prepare", ["ours", "peft"])
def test_kbit_preparation_and_gradient_checkpointing(prepare, load) -> None:
    preparations = {
        "ours": prepare_model_for_kbit_training,
        "peft": peft.prepare_model_for_kbit_training,
    }
    prep = preparations[prepare]
    model = prep(load("llama", "4bit", dtype=torch.bfloat16))
    assert _checkpointing(model)
    plain = [p for p in model.parameters() if type(p) is nn.Parameter]
    assert plain and all(p.dtype == torch.float32 and not p.requires_grad for p in plain)
    ours = get_peft_model(model, _config(AdaLoraConfig, init_lora_weights=False))

    # the same preparation without checkpointing: gradients must not change
    unchecked = prep(load("llama", "4bit", dtype=torch.bfloat16), use_gradient_checkpointing=False)
    assert not _checkpointing(unchecked)
    reference = get_peft_model(unchecked, _config(AdaLoraConfig, init_lora_weights=False))
    reference.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if ".lora_" in k}, strict=False
    )
    grads = []
    for model in (ours, reference):
        model.train()
        model(**_batch(0)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_preparation_leaves_a_full_precision_model_without_checkpointing(load) -> None:
    model = prepare_model_for_kbit_training(load("opt", None, dtype=torch.float16))
    assert not _checkpointing(model)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_trainer_trains_a_4bit_base_with_the_callback(load, tmp_path) -> None:
    # transformers refuses "purely quantized" models unless adapters are attached: ours are, and
    # the Trainer must see it; gradient checkpointing on, as users of k-bit training run it
    from transformers import Trainer, TrainingArguments

    from adalora_hf import AdaLoraCallback

    base = prepare_model_for_kbit_training(load("opt", "4bit"))
    model = get_peft_model(base, _config(AdaLoraConfig, total_step=None))
    data = [{k: v[0] for k, v in _batch(i).items()} for i in range(24)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, gradient_checkpointing=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ours = model.base_model
    assert ours.peft_config["default"].total_step == STEPS  # filled in by the callback
    assert ours.rankallocator.finalized
    assert ours.total_rank() == SCHEDULE["target_r"] * 2 * len(TARGETS)  # 2 layers
    assert isinstance(base.model.decoder.layers[0].self_attn.q_proj, SVDLinear4bit)
