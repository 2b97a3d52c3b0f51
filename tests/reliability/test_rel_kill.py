"""Real crashes: training processes and a save killed with SIGKILL (rel_worker.py).

- Kill and resume: a run killed during the budgeting phase and resumed from its last complete
  checkpoint ends with the same rank pattern and bitwise the same adapter weights as an
  uninterrupted run, in a custom loop and with ``Trainer.train(resume_from_checkpoint=...)``.
- A save killed half-way through writing a file leaves the previous adapter loadable and
  unchanged (a directory holding only the adapter), or, in a directory with other files, either
  the previous adapter or a pair that loading refuses, never a mix that loads.

Each test starts two or three Python processes (a few seconds each), hence ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adalora_core import budget_schedule
from adalora_hf import AdaLoraModel

WORKER = Path(__file__).with_name("rel_worker.py")
TINIT, FINAL = 2, 9  # the worker's schedule: budgeting is steps 3..9
TIMEOUT = 300  # seconds; a safety net against a hung worker, not a measurement

pytestmark = pytest.mark.slow


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _finish(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-3000:]


def _kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; it must still be running then."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, f"the worker ended before the kill: {proc.stdout.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the worker never got there"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def _last_checkpoint(out: Path, loop: str) -> tuple[int, Path] | None:
    # the worker's rule (custom: ckpt-<step>.pt, written atomically; Trainer: a checkpoint-<step>
    # directory with the allocator state, which AdaLoraCallback writes last)
    found = []
    for path in out.iterdir() if out.is_dir() else []:
        name = path.name
        if loop == "custom" and name.startswith("ckpt-") and name.endswith(".pt"):
            found.append((int(name[5:-3]), path))
        complete = (path / "adalora_allocator.json").is_file()
        if loop == "trainer" and name.startswith("checkpoint-") and complete:
            found.append((int(name.split("-")[1]), path))
    return max(found) if found else None


@pytest.mark.parametrize("loop", ["custom", "trainer"])
def test_killed_run_resumes_exactly(loop: str, tmp_path: Path) -> None:
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    uninterrupted = _spawn("train", str(whole), "--loop", loop)
    victim = _spawn("train", str(crashed), "--loop", loop, "--stall-at", "8")

    def past_tinit() -> bool:
        last = _last_checkpoint(crashed, loop)
        return last is not None and last[0] > TINIT

    _kill_when(victim, past_tinit)
    _finish(uninterrupted)
    last = _last_checkpoint(crashed, loop)
    assert last is not None
    step, checkpoint = last
    assert TINIT < step < FINAL  # killed in the budgeting phase
    assert not (crashed / "final.json").exists()
    _finish(_spawn("train", str(crashed), "--loop", loop, "--resume", str(checkpoint)))

    a, b = (
        json.loads((whole / "final.json").read_text()),
        json.loads((crashed / "final.json").read_text()),
    )
    assert b["step"] == a["step"] == 12
    assert b["rank_pattern"] == a["rank_pattern"]
    assert sum(map(sum, a["rank_pattern"].values())) == 2 * 4  # target_r · n
    assert (crashed / "final.safetensors").read_bytes() == (
        whole / "final.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("hang_at", [1, 2])
@pytest.mark.parametrize("with_readme", [False, True], ids=["adapter-dir", "shared-dir"])
def test_save_killed_half_way(
    with_readme: bool, hang_at: int, tmp_path: Path, rel: SimpleNamespace
) -> None:
    extra = ["--with-readme"] if with_readme else []
    proc = _spawn("save-kill", str(tmp_path), "--hang-at", str(hang_at), *extra)
    _kill_when(proc, (tmp_path / "HALF-WRITTEN").is_file)
    adapter, v1 = tmp_path / "adapter", tmp_path / "v1"
    if with_readme:
        assert (adapter / "README.md").read_text() == "my notes\n"
    names = ["adapter_config.json", "adapter_model.safetensors"]
    same = all((adapter / n).read_bytes() == (v1 / n).read_bytes() for n in names)
    if with_readme and hang_at == 2:
        # per-file replacement: the new weights are in place, the config is the old one
        assert not same
        with pytest.raises(ValueError, match="come from different saves"):
            AdaLoraModel.from_pretrained(rel.tiny_bert(), adapter)
        return
    assert same, "the previous adapter was changed"
    # what is left loads, and is the first save: the pattern of step 5 (mid-budgeting, more
    # triplets than the target the second save reached) and weights that change the outputs
    loaded = AdaLoraModel.from_pretrained(rel.tiny_bert(), adapter)
    kept = sum(map(sum, loaded.peft_config["default"].rank_pattern.values()))
    budget, _ = budget_schedule(
        5, init_budget=16, target_budget=8, tinit=TINIT, tfinal=3, total_step=12, deltaT=1
    )
    assert kept == budget > 8
    inputs = {k: v for k, v in rel.batch(7).items() if k != "labels"}
    with torch.no_grad():
        assert not torch.allclose(
            loaded(**inputs).logits, rel.tiny_bert().eval()(**inputs).logits, atol=1e-4
        )
