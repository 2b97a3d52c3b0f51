"""AdaLoRA through ``transformers.Trainer`` + ``AdaLoraCallback`` under DDP (two gloo processes
on the CPU, launched like ``torchrun``), and saving under distribution.

The worker (tests/_dist_scripts/hf_trainer.py) trains a tiny float64 BERT for 12 steps with
4 samples per process and calls ``save_pretrained`` on every rank. The expected values come
from the same function run here in one process with 8 samples per step (the two ranks'
micro-batches, concatenated).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).resolve().parents[1] / "_dist_scripts"


@pytest.mark.slow
def test_trainer_ddp_ranks_agree_hit_the_budget_and_rank0_saves(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    common = importlib.import_module("_common")
    worker = importlib.import_module("hf_trainer")
    out = tmp_path / "ddp"
    out.mkdir()
    common.launch("hf_trainer.py", str(out), timeout=300)
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]

    # both ranks: DDP-wrapped by the Trainer, the same pattern after every step, and exactly
    # the target budget (target_r 2 x 4 matrices) at the end
    for got in ranks:
        assert got["wrapped"] == "DistributedDataParallel"
        assert got["total_step"] == 12 and got["finalized"]
        assert got["target_budget"] == 8 == sum(got["kept"].values())
    assert ranks[0]["patterns"] == ranks[1]["patterns"]
    assert ranks[0]["kept"] == ranks[1]["kept"]
    assert sorted(map(int, ranks[0]["patterns"])) == list(range(4, 13))  # first allocation: 4

    # saving under distribution: rank 0 wrote the adapter, rank 1 nothing
    assert (out / "saved_by_rank0" / "adapter_model.safetensors").is_file()
    assert not (out / "saved_by_rank1").exists()

    # one process on the same global batches: the same patterns and the same saved adapter
    single = tmp_path / "single"
    reference = worker.run(single, world=1)
    sys.modules.pop("hf_trainer", None)
    assert reference["wrapped"] == "AdaLoraModel"
    assert ranks[0]["patterns"] == reference["patterns"]
    assert ranks[0]["kept"] == reference["kept"]
    config = json.loads((out / "saved_by_rank0" / "adapter_config.json").read_text())
    expected = json.loads((single / "saved_by_rank0" / "adapter_config.json").read_text())
    assert config == expected  # rank_pattern included
    got = load_file(str(out / "saved_by_rank0" / "adapter_model.safetensors"))
    want = load_file(str(single / "saved_by_rank0" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.slow
def test_documented_accelerate_example_runs(tmp_path, monkeypatch) -> None:
    """docs/distributed.md's ``train_accelerate.py``, run with ``accelerate launch --multi_gpu
    --num_processes 2`` (CPU processes, gloo): both ranks keep the same pattern."""
    pytest.importorskip("accelerate")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    common = importlib.import_module("_common")
    script = tmp_path / "train_accelerate.py"
    script.write_text(common.doc_script("train_accelerate.py"))
    proc = common.launch(script, launcher="accelerate", cwd=tmp_path, allow_exit_abort=True)
    # the two processes share stdout: their lines may interleave
    kept = dict(re.findall(r"rank (\d): kept (\{[^}]*\})", proc.stdout))
    assert sorted(kept) == ["0", "1"] and kept["0"] == kept["1"], proc.stdout
