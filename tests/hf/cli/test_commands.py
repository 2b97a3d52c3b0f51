"""The ``adalora`` entry points and argument checks (before any work)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RunCli = Callable[..., tuple[int, str, str]]  # the run_cli fixture


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adalora_hf", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_arguments_exit_2_before_any_work(tmp_path: Path, run_cli: RunCli) -> None:
    assert run_cli("demo", "--steps", "0")[0] == 2
    assert run_cli("frobnicate")[0] == 2
    assert run_cli("demo", "--tinit-frac", "0.6", "--tfinal-frac", "0.5")[0] == 2
    cache = tmp_path / "cache"
    code, _, stderr = run_cli("demo", "--init-r", "4", "--target-r", "6", "--cache-dir", str(cache))
    assert code == 2 and "lower target_r or raise init_r" in stderr
    assert not cache.exists()  # refused before pretraining
