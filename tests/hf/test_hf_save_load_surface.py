"""PEFT's save/load surface on our models, with PEFT as the oracle where it applies:
save_pretrained's keywords (safe_serialization=False writes adapter_model.bin), the README
model card, load_adapter's result and reloading under an existing name, from_pretrained's
config=, push_to_hub (against a stand-in Hub client), and adapter names that are one safe
path component."""

from __future__ import annotations

import os
import pickle
from typing import ClassVar

import pytest
import torch

from adalora_hf import AdaLoraConfig, AdaLoraModel, get_peft_model

peft = pytest.importorskip("peft")


def _config(schedule, **overrides) -> AdaLoraConfig:
    return AdaLoraConfig(**schedule(init_lora_weights=False, **overrides))


def _peft_config(schedule) -> peft.AdaLoraConfig:
    return peft.AdaLoraConfig(**schedule(init_lora_weights=False))


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_safe_serialization_false_writes_what_peft_writes(make_base, schedule, tmp_path) -> None:
    torch.manual_seed(1)
    ours = get_peft_model(make_base("bert"), _config(schedule))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make_base("bert"), _peft_config(schedule))
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    theirs.save_pretrained(str(tmp_path / "theirs"), safe_serialization=False)
    names = {"adapter_config.json", "adapter_model.bin", "README.md"}
    assert set(os.listdir(tmp_path / "ours")) == set(os.listdir(tmp_path / "theirs")) == names
    mine = torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True)
    peft_s = torch.load(tmp_path / "theirs" / "adapter_model.bin", weights_only=True)
    assert set(mine) == set(peft_s)


def test_a_bin_adapter_loads_in_both_libraries(make_base, schedule, bert_batch, tmp_path) -> None:
    model = get_peft_model(make_base("bert"), _config(schedule))
    model.save_pretrained(tmp_path, safe_serialization=False)
    expected = _logits(model, bert_batch)
    ours = AdaLoraModel.from_pretrained(make_base("bert"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base("bert"), str(tmp_path))
    torch.testing.assert_close(_logits(ours, bert_batch), expected)
    torch.testing.assert_close(_logits(theirs, bert_batch), expected)
    # saving safetensors again removes the .bin (the loader would prefer the newer file anyway)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.bin").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_a_bin_is_read_with_weights_only(make_base, schedule, tmp_path) -> None:
    model = get_peft_model(make_base("bert"), _config(schedule))
    model.save_pretrained(tmp_path, safe_serialization=False)
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        AdaLoraModel.from_pretrained(make_base("bert"), tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_embedding_layers": True}, "save_embedding_layers=True"),
        ({"path_initial_model_for_weight_conversion": "x"}, "PiSSA/OLoRA"),
        ({"max_shard_size": "1GB"}, "does not support"),
    ],
)
def test_save_keywords_that_cannot_be_honoured_raise(
    make_base, schedule, tmp_path, kwargs, match
) -> None:
    model = get_peft_model(make_base("bert"), _config(schedule))
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "ok", save_embedding_layers=False, is_main_process=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ephemeral_gpu_offload": True}, "ephemeral_gpu_offload"),
        ({"key_mapping": {"a": "b"}}, "key_mapping"),
        ({"device_map": "auto"}, "device_map"),
        ({"device_map": {"": "meta"}}, "device_map"),
        ({"revision": "main"}, "does not support"),
    ],
)
def test_load_keywords_that_cannot_be_honoured_raise(
    make_base, schedule, tmp_path, kwargs, match
) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        AdaLoraModel.from_pretrained(make_base("bert"), tmp_path, **kwargs)


def test_load_keywords_peft_code_passes(make_base, schedule, bert_batch, tmp_path) -> None:
    model = get_peft_model(make_base("bert"), _config(schedule))
    model.save_pretrained(tmp_path)
    loaded = AdaLoraModel.from_pretrained(
        make_base("bert"), tmp_path, torch_device="cpu", low_cpu_mem_usage=True,
        autocast_adapter_dtype=True, device_map={"": "cpu"},
    )  # fmt: skip
    torch.testing.assert_close(_logits(loaded, bert_batch), _logits(model, bert_batch))


@pytest.mark.parametrize("autocast", [True, False])
def test_from_pretrained_autocast_adapter_dtype_as_peft(
    make_base, schedule, tmp_path, autocast
) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path)
    ours = AdaLoraModel.from_pretrained(
        make_base("bert").half(), tmp_path, autocast_adapter_dtype=autocast
    )
    theirs = peft.PeftModel.from_pretrained(
        make_base("bert").half(), tmp_path, autocast_adapter_dtype=autocast
    )
    dtypes = {n.split("lora_")[1]: p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    expected = {n.split("lora_")[1]: p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert dtypes == expected
    assert set(dtypes.values()) == {torch.float32 if autocast else torch.float16}


def test_from_pretrained_config_replaces_the_saved_one(make_base, schedule, tmp_path) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path)
    config = _config(schedule, orth_reg_weight=0.25)
    loaded = AdaLoraModel.from_pretrained(make_base("bert"), tmp_path, config=config)
    assert loaded.peft_config["default"].orth_reg_weight == 0.25
    assert config.inference_mode is False  # the caller's object is not changed


def test_load_adapter_returns_peft_load_result(make_base, schedule, tmp_path) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path)
    ours = get_peft_model(make_base("bert"), _config(schedule))
    theirs = peft.get_peft_model(make_base("bert"), _peft_config(schedule))
    result = ours.load_adapter(tmp_path, "second")
    expected = theirs.load_adapter(str(tmp_path), "second")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert (list(expected.missing_keys), list(expected.unexpected_keys)) == ([], [])


def _perturbed(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.5)


def test_loading_under_an_existing_name_replaces_its_weights(
    make_base, schedule, bert_batch, tmp_path
) -> None:
    # as PEFT's Whisper example reloads the best checkpoint: load_adapter(path, "default")
    saved = get_peft_model(make_base("bert"), _config(schedule))
    _perturbed(saved)
    saved.save_pretrained(tmp_path)
    expected = _logits(saved, bert_batch)
    for lib in ("ours", "peft"):
        if lib == "ours":
            model = get_peft_model(make_base("bert"), _config(schedule))
        else:
            model = peft.get_peft_model(make_base("bert"), _peft_config(schedule))
        trains = [n for n, p in model.named_parameters() if p.requires_grad]
        result = model.load_adapter(str(tmp_path), "default")
        assert list(result.unexpected_keys) == []
        torch.testing.assert_close(_logits(model, bert_batch), expected, msg=lib)
        assert list(model.peft_config) == ["default"]
        assert [n for n, p in model.named_parameters() if p.requires_grad] == trains, lib


def test_reloading_a_shrunk_adapter_into_a_full_rank_one(
    make_base, schedule, bert_batch, tmp_path
) -> None:
    saved = get_peft_model(make_base("bert"), _config(schedule))
    adalora = saved.base_model
    modules = [p for p in adalora.adapter_state_dict() if p.endswith(".lora_E")]
    pattern = {k.removeprefix("base_model.model.") + ".default": [True, False, True, False]
               for k in modules}  # fmt: skip
    adalora.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():  # what the allocator's mask does to E
        for name, p in saved.named_parameters():
            if ".lora_E." in name:
                p[1::2] = 0
    saved.save_pretrained(tmp_path)
    model = get_peft_model(make_base("bert"), _config(schedule))
    model.load_adapter(tmp_path, "default")
    torch.testing.assert_close(_logits(model, bert_batch), _logits(saved, bert_batch))
    assert model.base_model.peft_config["default"].rank_pattern == pattern


def test_reload_refuses_an_adapter_of_another_shape(make_base, schedule, tmp_path) -> None:
    get_peft_model(make_base("bert"), _config(schedule, init_r=6)).save_pretrained(tmp_path)
    model = get_peft_model(make_base("bert"), _config(schedule))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="another init_r"):
        model.load_adapter(tmp_path, "default")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_pretrained_writes_a_model_card_as_peft(make_base, schedule, tmp_path) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(make_base("bert"), _peft_config(schedule)).save_pretrained(
        str(tmp_path / "theirs")
    )
    for lib in ("ours", "theirs"):
        text = (tmp_path / lib / "README.md").read_text()
        assert text.startswith("---\n") and "library_name: peft" in text, lib
    assert "- adalora " in (tmp_path / "ours" / "README.md").read_text()


def test_an_existing_readme_is_kept(make_base, schedule, tmp_path) -> None:
    (tmp_path / "README.md").write_text("# My adapter\n\nNotes.\n")
    model = get_peft_model(make_base("bert"), _config(schedule))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    # a file the save did not write is never touched (PEFT adds its metadata to it)
    assert (tmp_path / "README.md").read_text() == "# My adapter\n\nNotes.\n"


class _FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and the uploaded files."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, token=None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, **kwargs):
        files = sorted(os.listdir(folder_path))
        self.calls.append(("upload_folder", {"files": files, **kwargs}))
        return "commit-info"


def test_push_to_hub_uploads_the_adapter_only(make_base, schedule, monkeypatch) -> None:
    import huggingface_hub

    _FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    model = get_peft_model(make_base("bert"), _config(schedule))
    result = model.push_to_hub("me/adapter", private=True, token="t", commit_message="c")
    assert result == "commit-info"
    kinds = [name for name, _ in _FakeHub.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    create, upload = _FakeHub.calls[1][1], _FakeHub.calls[2][1]
    assert create["repo_id"] == "me/adapter" and create["private"] is True
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert upload["repo_id"] == "me/adapter" and upload["commit_message"] == "c"


BAD_NAMES = ["/some/abs/path", "a/b", "a\\b", "..", ".", "", "a\0b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_add_adapter_refuses_a_name_that_is_not_one_path_component(
    make_base, schedule, name
) -> None:
    model = AdaLoraModel(make_base("bert"), _config(schedule))
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        model.add_adapter(name, _config(schedule, inference_mode=True))
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_adapter_and_from_pretrained_refuse_such_names(
    make_base, schedule, tmp_path, name
) -> None:
    get_peft_model(make_base("bert"), _config(schedule)).save_pretrained(tmp_path)
    model = AdaLoraModel(make_base("bert"), _config(schedule))
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        model.load_adapter(tmp_path, name)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        AdaLoraModel.from_pretrained(make_base("bert"), tmp_path, adapter_name=name)
    assert list(model.peft_config) == ["default"]


def test_two_models_from_one_config_save_their_own_rank_pattern(
    make_base, schedule, bert_batch, tmp_path
) -> None:
    # PEFT keeps the caller's object, so the untrained model would save the trained one's pattern
    config = _config(schedule)
    trained, untouched = (
        get_peft_model(make_base("bert"), config),
        get_peft_model(make_base("bert"), config),
    )
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for step in range(1, 12):
        trained(**bert_batch).loss.backward()
        optimizer.step()
        trained.update_and_allocate(step)
        optimizer.zero_grad()
    assert trained.peft_config["default"].rank_pattern is not None
    untouched.save_pretrained(tmp_path)
    assert AdaLoraConfig.from_pretrained(tmp_path).rank_pattern is None
    assert config.rank_pattern is None
