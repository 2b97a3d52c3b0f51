"""PEFT's file format both ways: adapters saved here load in peft 0.21.2 and the reverse.

Each adapter is trained through the final allocation first, so the saved tensors are shrunk
by the rank pattern; equality of logits is checked against the model that saved the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adalora_hf
from adalora_hf import AdaLoraConfig, AdaLoraModel, get_peft_model

STEPS = 12
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)


def _train(
    model: nn.Module, batch: Callable[[int], dict], allocate: Callable[[int], object]
) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(STEPS):
        model(**batch(step)).loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
    model.eval()


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    # no labels: PEFT's AdaLoraModel.forward fails on a loss without a trainable adapter
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def _peft_from_pretrained(base: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_adapter_saved_here_loads_in_peft(kind, make_base, tiny, schedule, tmp_path) -> None:
    family = tiny[kind]
    kw = schedule(task_type=family.task_type, init_lora_weights=False)
    ours = get_peft_model(make_base(kind), AdaLoraConfig(**kw))
    _train(ours, family.batch, ours.base_model.update_and_allocate)
    ours.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["inference_mode"] is True
    pattern = config["rank_pattern"]
    assert pattern == {
        k.removesuffix(".default"): v for k, v in ours.peft_config["default"].rank_pattern.items()
    }
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(".default" in k or "ranknum" in k for k in tensors)
    for key, mask in pattern.items():
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert tensors[module + ".lora_A"].shape == (
            sum(mask),
            tensors[module + ".lora_A"].shape[1],
        )
        assert tensors[module + ".lora_E"].shape == (sum(mask), 1)
        assert tensors[module + ".lora_B"].shape == (
            tensors[module + ".lora_B"].shape[0],
            sum(mask),
        )
    # the run ended at the target budget, so the file is smaller than the initial ranks
    assert sum(map(sum, pattern.values())) == kw["target_r"] * len(pattern)
    assert sum(map(sum, pattern.values())) < kw["init_r"] * len(pattern)

    theirs = _peft_from_pretrained(make_base(kind), tmp_path)
    batch = family.batch(99)
    expected = _logits(ours, batch)
    torch.testing.assert_close(_logits(theirs, batch), expected, **LOGIT_TOL)
    assert not torch.allclose(_logits(make_base(kind).eval(), batch), expected, atol=1e-4)

    # PEFT re-saves exactly what we wrote
    theirs.save_pretrained(str(tmp_path / "resaved"))
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(resaved) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(resaved[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("loader", ["AdaLoraModel", "PeftModel"])
def test_adapter_saved_by_peft_loads_here(
    kind, loader, make_base, tiny, schedule, tmp_path
) -> None:
    family = tiny[kind]
    kw = schedule(task_type=family.task_type, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_base(kind), peft.AdaLoraConfig(**kw))
    _train(theirs, family.batch, theirs.base_model.update_and_allocate)
    theirs.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))

    cls = AdaLoraModel if loader == "AdaLoraModel" else adalora_hf.PeftModel
    ours = cls.from_pretrained(make_base(kind), tmp_path)
    assert not ours.training
    assert all(not p.requires_grad for p in ours.parameters())
    batch = family.batch(99)
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), **LOGIT_TOL)

    # per-module ranks from the rank pattern, ranknum still init_r
    adalora = ours.base_model
    for name, param in adalora.named_parameters():
        if ".lora_A." in name:
            key = "base_model." + name.removesuffix(".default")
            assert param.shape == tensors[key].shape
        if ".ranknum." in name:
            assert param.item() == kw["init_r"]

    ours.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(resaved) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(resaved[key], value, rtol=0, atol=0)
    a = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    b = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["rank_pattern"]
    assert a == b


def test_second_adapter_goes_to_a_subdirectory(make_base, schedule, bert_batch, tmp_path) -> None:
    model = AdaLoraModel(make_base("bert"), AdaLoraConfig(**schedule(init_lora_weights=False)))
    model.add_adapter("other", AdaLoraConfig(**schedule(), inference_mode=True))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = AdaLoraModel.from_pretrained(make_base("bert"), tmp_path)
    model.eval()
    torch.testing.assert_close(_logits(loaded, bert_batch), _logits(model, bert_batch))


def test_a_bin_file_that_is_not_a_pickle_of_tensors_is_refused(
    make_base, schedule, tmp_path
) -> None:
    model = AdaLoraModel(make_base("bert"), AdaLoraConfig(**schedule()))
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\)"):
        AdaLoraModel.from_pretrained(make_base("bert"), tmp_path)


def test_file_missing_tensors_is_an_error(make_base, schedule, tmp_path) -> None:
    model = AdaLoraModel(make_base("bert"), AdaLoraConfig(**schedule()))
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "layer.1." not in k}, path)
    with pytest.raises(ValueError, match="lacks"):
        AdaLoraModel.from_pretrained(make_base("bert"), tmp_path)


def test_loaded_adapter_can_keep_training(make_base, tiny, schedule, tmp_path) -> None:
    kw = schedule(task_type="SEQ_CLS", init_lora_weights=False)
    first = get_peft_model(make_base("bert"), AdaLoraConfig(**kw))
    _train(first, tiny["bert"].batch, first.base_model.update_and_allocate)
    first.save_pretrained(tmp_path)
    again = adalora_hf.PeftModel.from_pretrained(make_base("bert"), tmp_path, is_trainable=True)
    names = {n for n, p in again.named_parameters() if p.requires_grad}
    assert names == {n for n, p in first.named_parameters() if p.requires_grad}
    assert again.base_model.trainable_adapter_name == "default"


def test_physically_shrunk_adapter_saves_and_loads_in_peft(
    make_base, tiny, schedule, tmp_path
) -> None:
    from adalora_torch import shrink_to_pattern

    family = tiny["bert"]
    kw = schedule(task_type="SEQ_CLS", init_lora_weights=False)
    ours = get_peft_model(make_base("bert"), AdaLoraConfig(**kw))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    ours.train()
    for step in range(STEPS):
        ours(**family.batch(step)).loss.backward()
        opt.step()
        ours.base_model.update_and_allocate(step)
        opt.zero_grad()
        if step == 9:  # the final allocation (total_step - tfinal): shrink and keep training
            kept = shrink_to_pattern(ours.base_model.model, opt)
            assert sum(kept.values()) == 2 * len(kept)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = _peft_from_pretrained(make_base("bert"), tmp_path)
    batch = family.batch(99)
    torch.testing.assert_close(_logits(theirs, batch), _logits(ours, batch), **LOGIT_TOL)
