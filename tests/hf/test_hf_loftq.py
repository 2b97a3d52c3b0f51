"""``init_lora_weights="loftq"`` with ``loftq_config`` through ``adalora_hf``: the config (checked
in one place, stored as PEFT's plain dict), the model built from a full-precision tiny GPT-2
(its ``Conv1D`` targets become NF4 ``Linear4bit`` layers), and the saved adapter loading back
onto either base. Needs bitsandbytes (CPU) for the model tests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from adalora_hf import AdaLoraConfig, AdaLoraModel, LoftQConfig
from adalora_torch import SVDLinear4bit, SVDLinear8bitLt

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=99, n_positions=32, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 99, (4, 16), generator=torch.Generator().manual_seed(1))


def _config(**kw: object) -> AdaLoraConfig:
    base = dict(
        target_modules=TARGETS, init_r=8, target_r=4, lora_alpha=16,
        total_step=20, tinit=2, tfinal=4,
        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1),
    )  # fmt: skip
    base.update(kw)
    return AdaLoraConfig(**base)  # type: ignore[arg-type]


# -- config ----------------------------------------------------------------------------------
def test_loftq_config_is_stored_as_a_plain_dict_and_round_trips(tmp_path: Path) -> None:
    cfg = _config(loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=3))
    assert cfg.loftq_config == {"loftq_bits": 8, "loftq_iter": 3}
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 3}
    assert saved["init_lora_weights"] == "loftq"
    back = AdaLoraConfig.from_pretrained(tmp_path)
    assert back.loftq_config == cfg.loftq_config and back.init_lora_weights == "loftq"
    # a dict as PEFT writes it, with PEFT's default for a missing key
    assert _config(loftq_config={"loftq_bits": 4}).loftq_config == {
        "loftq_bits": 4,
        "loftq_iter": 1,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loftq_config": {"loftq_bits": 2}}, "loftq_bits=2 is not supported: use 4"),
        ({"loftq_config": {"loftq_bits": 4, "loftq_iter": 0}}, "loftq_iter=0 must be"),
        ({"loftq_config": {"bits": 4}}, r"unknown keys \['bits'\]"),
        ({"loftq_config": [4, 1]}, "loftq_config must be a LoftQConfig or a dict"),
        ({"loftq_config": {}}, "needs loftq_config"),
        ({"init_lora_weights": True}, "set init_lora_weights='loftq'"),
    ],
)
def test_bad_loftq_settings_say_what_to_change(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


# -- model -----------------------------------------------------------------------------------
@pytest.fixture
def bnb() -> object:
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()  # one bitsandbytes CPU path (eval repacks 4-bit weights for its kernels)
    with torch.no_grad():
        return model(input_ids=_ids()).logits


@pytest.mark.parametrize(("bits", "cls"), [(4, SVDLinear4bit), (8, SVDLinear8bitLt)])
def test_model_starts_closer_to_the_full_precision_model(bnb, bits, cls) -> None:
    ref = _logits(_gpt2())
    loftq_config = {"loftq_bits": bits, "loftq_iter": 1}
    model = AdaLoraModel(_gpt2(), _config(init_r=16, loftq_config=loftq_config))
    layers = [m for m in model.modules() if isinstance(m, SVDLinear4bit | SVDLinear8bitLt)]
    assert len(layers) == 8 and all(type(m) is cls for m in layers)
    assert all(bool((m.lora_E["default"] > 0).all()) for m in layers)
    loftq = _logits(model)
    # one iteration: the base holds the plain quantization of W, so E = 0 is the quantized model
    with torch.no_grad():
        for m in layers:
            m.lora_E["default"].zero_()
    plain = _logits(model)
    # random-init weights have no dominant directions, and LLM.int8() also rounds the
    # activations: measured 0.74 (4-bit) and 0.90 (8-bit) of the plain error
    bound = 0.85 if bits == 4 else 0.95
    assert float((loftq - ref).norm()) < bound * float((plain - ref).norm())


def test_training_starts_from_the_loftq_triplets(bnb) -> None:
    model = AdaLoraModel(_gpt2(), _config())
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for _, p in model.named_parameters() if p.requires_grad)
    model.update_and_allocate(1)


def test_saved_adapter_loads_onto_the_full_precision_or_the_quantized_base(
    bnb, tmp_path: Path
) -> None:
    model = _trained(0)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    # onto the full-precision base: LoftQ recomputes the same quantized base, the file the
    # triplets
    again = AdaLoraModel.from_pretrained(_gpt2(), tmp_path)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-5, atol=1e-5)
    # onto the quantized base it was trained on: the base is kept as it is
    quantized_base = model.unload()
    onto_q = AdaLoraModel.from_pretrained(quantized_base, tmp_path)
    torch.testing.assert_close(_logits(onto_q), trained, rtol=1e-5, atol=1e-5)
    # a second copy under another name goes onto the same (adapted, quantized) layers
    onto_q.load_adapter(tmp_path, adapter_name="again")
    onto_q.set_adapter("again")
    torch.testing.assert_close(_logits(onto_q), trained, rtol=1e-5, atol=1e-5)


def test_creating_a_loftq_adapter_on_a_quantized_base_is_refused(bnb) -> None:
    quantized_base = AdaLoraModel(_gpt2(), _config()).unload()
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        AdaLoraModel(quantized_base, _config())
    model = AdaLoraModel(_gpt2(), _config())
    with pytest.raises(ValueError, match="already holds an adapter"):
        model.add_adapter("second", _config(inference_mode=True))


def _trained(seed: int) -> AdaLoraModel:
    model = AdaLoraModel(_gpt2(), _config(loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after training: the triplets moved
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def test_peft_loads_the_adapter_onto_the_quantized_base_once_loftq_is_unset(
    bnb, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft", reason="peft (the test oracle) is not installed")
    model = _trained(3)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    with pytest.raises(ValueError, match="LOFTQ"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older PEFT: fields it does not know yet
        peft.AdaLoraConfig.from_pretrained(str(tmp_path))  # PEFT's AdaLoRA refuses LoftQ
    # the documented workaround: the quantized base, and the config without LoftQ
    config_file.write_text(json.dumps({**saved, "init_lora_weights": True, "loftq_config": {}}))
    theirs = peft.PeftModel.from_pretrained(_trained(3).unload(), tmp_path)
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-4, atol=1e-4)


def test_a_pruned_and_shrunk_adapter_reloads_onto_the_same_quantized_base(
    bnb, tmp_path: Path
) -> None:
    # from the second iteration on Q depends on the rank of the fit: a reload that creates the
    # layers at their kept ranks must still quantize with the fit at init_r
    from adalora_torch import shrink_to_pattern

    loftq_config = {"loftq_bits": 4, "loftq_iter": 2}
    model = AdaLoraModel(
        _gpt2(), _config(loftq_config=loftq_config, total_step=12, tinit=2, tfinal=4, deltaT=1)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(12):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    shrink_to_pattern(model.model, optimizer)
    assert any(m.lora_E["default"].shape[0] < 8 for m in _loftq_layers(model))
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    again = AdaLoraModel.from_pretrained(_gpt2(), tmp_path)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-5, atol=1e-5)


def _loftq_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SVDLinear4bit | SVDLinear8bitLt)]


def test_an_adapter_made_with_other_loftq_settings_is_refused_on_a_loftq_base(
    bnb, tmp_path: Path
) -> None:
    AdaLoraModel(_gpt2(), _config(loftq_config={"loftq_bits": 4, "loftq_iter": 2})).save_pretrained(
        tmp_path
    )
    model = AdaLoraModel(_gpt2(), _config())  # loftq_iter=1: another quantized weight
    with pytest.raises(ValueError, match="pair with another quantized weight"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_a_non_finite_weight_is_refused_before_any_change(bnb) -> None:
    base = _gpt2()
    with torch.no_grad():
        base.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        AdaLoraModel(base, _config())
    assert not _loftq_layers(base)


def test_loftq_bits_must_be_an_integer() -> None:
    with pytest.raises(ValueError, match=r"loftq_bits=4\.0"):
        _config(loftq_config={"loftq_bits": 4.0, "loftq_iter": 1})
