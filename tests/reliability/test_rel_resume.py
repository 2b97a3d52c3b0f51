"""Exact resume, in process: a run checkpointed at step k (warm-up, budgeting, final phase) and
continued by a new process-like setup (fresh model, fresh optimizer, state loaded without
pickle) ends bitwise equal to an uninterrupted run. (test_rel_kill.py does it with SIGKILL.)"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from adalora_hf import AdaLoraConfig, AdaLoraModel
from adalora_hf._callback import _earlier_complete_checkpoint

WORKER = Path(__file__).with_name("rel_worker.py")


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    """rel_worker.py, whose save_checkpoint / load_checkpoint are the ones of docs/errors.md."""
    spec = importlib.util.spec_from_file_location("rel_worker_module", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fresh(rel: SimpleNamespace) -> tuple[AdaLoraModel, torch.optim.Optimizer]:
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    return model, optimizer


def _assert_same_run(a: AdaLoraModel, b: AdaLoraModel) -> None:
    assert b.rank_pattern == a.rank_pattern and a.rank_pattern is not None
    assert b.total_rank() == a.total_rank() == 2 * 4
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x, y = a.rankallocator.state_dict(), b.rankallocator.state_dict()
    assert {k: v for k, v in x.items() if not k.startswith("ema")} == {
        k: v for k, v in y.items() if not k.startswith("ema")
    }


@pytest.mark.parametrize("stop", [2, 5, 10], ids=["warm-up", "budgeting", "final"])
@pytest.mark.parametrize("files", ["torch.save", "safetensors+json"])
def test_resume_is_bitwise(
    stop: int, files: str, rel: SimpleNamespace, worker: ModuleType, tmp_path: Path
) -> None:
    whole, optimizer = _fresh(rel)
    rel.train_steps(whole, range(1, 13), optimizer)

    first, optimizer = _fresh(rel)
    rel.train_steps(first, range(1, stop + 1), optimizer)
    path = str(tmp_path / "ckpt.pt")
    if files == "torch.save":  # the custom loop of docs/errors.md
        worker.save_checkpoint(path, first, optimizer, stop)
    else:  # the files AdaLoraCallback writes: allocator as JSON + safetensors
        keys = first.adapter_state_keys()
        adapter = {k: v.contiguous() for k, v in first.state_dict().items() if k in keys}
        save_file(adapter, str(tmp_path / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), path)
        first.save_allocator_state(tmp_path)
    del first, optimizer

    second, optimizer = _fresh(rel)
    if files == "torch.save":
        start = worker.load_checkpoint(path, second, optimizer)
    else:
        second.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
        optimizer.load_state_dict(torch.load(path, weights_only=True))
        assert second.load_allocator_state(tmp_path)
        start = stop + 1
    assert start == stop + 1
    rel.train_steps(second, range(start, 13), optimizer)
    _assert_same_run(whole, second)


def test_resume_warning_names_the_last_complete_checkpoint(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "adalora_allocator.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    hint = _earlier_complete_checkpoint(args, 6)
    assert "checkpoint-4" in hint and "killed while saving" in hint
    assert _earlier_complete_checkpoint(args, 2) == ""
