"""Crash-safe saves, in process: a save that fails at any point (a write stopped half-way, a
rename that fails) leaves the previous adapter loadable and unchanged, or, in a directory shared
with other files, a pair that loading refuses; other files are never touched. (test_rel_kill.py
does the same with SIGKILL.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import adalora_hf._io as io_
from adalora_hf import AdaLoraConfig, AdaLoraModel

NAMES = ("adapter_config.json", "adapter_model.safetensors")
SAVED = sorted(["README.md", *NAMES])  # what save_pretrained writes: the adapter and its card


class Crash(Exception):
    """Stands for the process dying at this point."""


@pytest.fixture
def two_states(rel: SimpleNamespace) -> tuple[AdaLoraModel, Any]:
    """A model during budgeting and a function that trains it on to the end (another rank
    pattern and other weights)."""
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    optimizer = rel.train_steps(model, range(1, 6))
    return model, lambda: rel.train_steps(model, range(6, 13), optimizer)


def _logits(model: AdaLoraModel, rel: SimpleNamespace) -> torch.Tensor:
    inputs = {k: v for k, v in rel.batch(7).items() if k != "labels"}
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _half_write_then_crash(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    calls = 0
    real = io_._write_synced

    def write(path: str, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls < at:
            return real(path, data)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise Crash(path)

    monkeypatch.setattr(io_, "_write_synced", write)


def _fail_call(monkeypatch: pytest.MonkeyPatch, name: str, at: int) -> None:
    calls = 0
    real = getattr(os, name)

    def fail(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == at:
            raise Crash(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(io_.os, name, fail)


def test_save_modes(tmp_path: Path) -> None:
    files = {"a.json": b"1", "b.bin": b"2"}
    assert io_.write_files_atomic(tmp_path / "new", files) == "created"
    assert io_.write_files_atomic(tmp_path / "new", {"a.json": b"3", "b.bin": b"4"}) == "swapped"
    assert (tmp_path / "new" / "a.json").read_bytes() == b"3"
    (tmp_path / "new" / "notes.txt").write_text("mine")
    assert io_.write_files_atomic(tmp_path / "new", files) == "per-file"
    assert _entries(tmp_path / "new") == ["a.json", "b.bin", "notes.txt"]
    assert _entries(tmp_path) == ["new"]  # no temporary or backup left behind


@pytest.mark.parametrize("spelling", [".", "./", ""])
def test_save_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    # the working directory cannot be renamed: empty or holding only a previous adapter, it
    # is written file by file, and nothing is created beside it
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = spelling or str(work)
    assert io_.write_files_atomic(target, {"a.json": b"1", "b.bin": b"2"}) == "per-file"
    assert io_.write_files_atomic(target, {"a.json": b"3", "b.bin": b"4"}) == "per-file"
    assert (work / "a.json").read_bytes() == b"3" and (work / "b.bin").read_bytes() == b"4"
    assert _entries(work) == ["a.json", "b.bin"]
    assert _entries(tmp_path) == ["work"]


def test_adapter_saves_into_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from adalora_hf import AdaLoraConfig, AdaLoraModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = AdaLoraModel(
        BertForSequenceClassification(config),
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["query"]),
    )
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(".")
    model.save_pretrained("./")
    assert sorted(p.name for p in tmp_path.iterdir()) == SAVED


@pytest.mark.parametrize(
    "crash",
    ["first-write", "second-write", "exchange", "fallback-second-rename"],
)
def test_failed_save_keeps_the_previous_adapter(
    crash: str,
    two_states: Any,
    tmp_path: Path,
    rel: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, train_on = two_states
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = {n: (target / n).read_bytes() for n in NAMES}
    expected = _logits(AdaLoraModel.from_pretrained(rel.tiny_bert(), target), rel)
    train_on()
    if crash == "first-write":
        _half_write_then_crash(monkeypatch, 1)
    elif crash == "second-write":
        _half_write_then_crash(monkeypatch, 2)
    elif crash == "exchange":
        monkeypatch.setattr(io_, "_exchange", lambda a, b: (_ for _ in ()).throw(Crash("swap")))
    else:  # no atomic exchange: old -> backup works, new -> place fails; the old comes back
        monkeypatch.setattr(io_, "_exchange", lambda a, b: False)
        _fail_call(monkeypatch, "rename", 2)
    with pytest.raises(Crash):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert {n: (target / n).read_bytes() for n in NAMES} == before
    assert _entries(tmp_path) == ["adapter"]  # temporaries cleaned up
    loaded = AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    torch.testing.assert_close(_logits(loaded, rel), expected, rtol=0, atol=0)
    model.save_pretrained(target)  # and the next save works
    again = AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    torch.testing.assert_close(_logits(again, rel), _logits(model, rel))


def test_swap_without_exchange_leaves_no_backup(
    two_states: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, train_on = two_states
    model.save_pretrained(tmp_path / "adapter")
    train_on()
    monkeypatch.setattr(io_, "_exchange", lambda a, b: False)
    model.save_pretrained(tmp_path / "adapter")
    assert _entries(tmp_path) == ["adapter"]
    assert _entries(tmp_path / "adapter") == SAVED


def test_shared_directory_keeps_other_files_and_refuses_a_mixed_pair(
    two_states: Any, tmp_path: Path, rel: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, train_on = two_states
    target = tmp_path / "run"
    target.mkdir()
    (target / "README.md").write_text("my notes\n")
    (target / "tokenizer").mkdir()
    readme = (target / "README.md").stat().st_mtime_ns
    model.save_pretrained(target)
    train_on()
    # 1) crash while writing the weights: the previous adapter is intact
    _half_write_then_crash(monkeypatch, 1)
    with pytest.raises(Crash):
        model.save_pretrained(target)
    monkeypatch.undo()
    AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    # 2) crash between the two replacements: new weights, old config, and loading refuses
    _fail_call(monkeypatch, "replace", 2)
    with pytest.raises(Crash):
        model.save_pretrained(target)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="come from different saves"):
        AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    assert (target / "README.md").read_text() == "my notes\n"
    assert (target / "README.md").stat().st_mtime_ns == readme
    assert _entries(target) == ["README.md", *NAMES, "tokenizer"]
    model.save_pretrained(target)  # saving again repairs it
    loaded = AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    torch.testing.assert_close(_logits(loaded, rel), _logits(model, rel))


def test_stale_temporaries_are_ignored(
    two_states: Any, tmp_path: Path, rel: SimpleNamespace
) -> None:
    model, _ = two_states
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / "adapter_model.safetensors.tmp-999999").write_bytes(b"half a file")
    (tmp_path / "adapter.tmp-999999").mkdir()  # a killed process's directory
    AdaLoraModel.from_pretrained(rel.tiny_bert(), target)
    model.save_pretrained(target)  # still only adapter files: replaced as a whole
    assert _entries(target) == SAVED


def test_a_backup_left_by_a_crash_is_named_in_the_error(
    tmp_path: Path, rel: SimpleNamespace
) -> None:
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    model.save_pretrained(tmp_path / "adapter")
    shutil.move(tmp_path / "adapter", tmp_path / "adapter.bak-4242")  # the crash window
    with pytest.raises(FileNotFoundError, match=r"previous content is complete in .*bak-4242"):
        AdaLoraModel.from_pretrained(rel.tiny_bert(), tmp_path / "adapter")


def test_config_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    AdaLoraConfig(init_r=6, target_r=2).save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_bytes()
    _half_write_then_crash(monkeypatch, 1)
    with pytest.raises(Crash):
        AdaLoraConfig(init_r=8, target_r=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_bytes() == before
    assert _entries(tmp_path) == ["adapter_config.json"]
    assert AdaLoraConfig.from_pretrained(tmp_path).init_r == 6


@pytest.mark.parametrize("at", [1, 2])
def test_allocator_state_save_is_atomic(
    at: int, two_states: Any, tmp_path: Path, rel: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, train_on = two_states
    model.save_allocator_state(tmp_path)
    saved = model.rankallocator.state_dict()
    train_on()
    # the second file (the JSON) failing after the first was replaced: a pair from two saves
    _half_write_then_crash(monkeypatch, at)
    with pytest.raises(Crash):
        model.save_allocator_state(tmp_path)
    monkeypatch.undo()
    fresh = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    if at == 2:
        with pytest.raises(ValueError, match="come from two different saves"):
            fresh.load_allocator_state(tmp_path)
        return
    assert fresh.load_allocator_state(tmp_path)
    restored = fresh.rankallocator.state_dict()
    assert restored["step"] == saved["step"] == 5
    for group in ("ema_sensitivity", "ema_uncertainty"):
        for key, value in saved[group].items():
            assert torch.equal(restored[group][key], value), key
