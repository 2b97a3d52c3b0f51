"""Shared by the ``adalora`` command tests: running the command in-process, checking a PNG,
and the demo, run once per session on a tiny setting (``--tiny``: a 2-layer, 16-wide ViT
pretrained for 40 steps, into a temporary cache) whose output the demo and inspect tests read.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from adalora_hf.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 30


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 200 and height >= 150


@pytest.fixture
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` of ``adalora *argv``, in-process."""
    return _run_cli


@pytest.fixture
def assert_png() -> Callable[..., None]:
    """``assert_png(path, min_bytes=5_000)``: a PNG of at least that size and 200×150 pixels."""
    return _assert_png


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """``adalora demo --tiny`` run once: (output directory, stdout, backbone cache)."""
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    code, stdout, stderr = _run_cli(
        "demo", "--tiny", "--steps", str(STEPS), "--seed", "1", "--out", str(out),
        "--cache-dir", str(cache), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    return out, stdout, cache
