"""Test matrix. `nox -s tests` is the default session; `nox -l` lists them all.

Every session installs torch through `constraints.txt` (the CPU build pinned there), so no
session pulls a multi-GB CUDA wheel. Set ADALORA_TORCH_SPEC (e.g. "torch==2.14.1") to try
another torch.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

CONSTRAINTS = ("-c", "constraints.txt")
PACKAGES = ("adalora_core", "adalora_torch", "adalora_hf")


def _install(session: nox.Session, extra: str, *pins: str) -> None:
    torch_spec = os.environ.get("ADALORA_TORCH_SPEC")
    constraints = () if torch_spec else CONSTRAINTS
    # torch first, from the pinned CPU build, so nothing later pulls a CUDA one
    session.install(*constraints, torch_spec or "torch")
    session.install(*constraints, "-e", f".[{extra}]", *pins)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The default session: every fast test (slow ones: `nox -s slow`), then the lint checks."""
    _install(session, "dev")
    session.run("pytest", "-m", "not slow", *session.posargs, env={"OMP_NUM_THREADS": "1"})
    _lint(session)


@nox.session(python="3.11")
def slow(session: nox.Session) -> None:
    """Long schedules and multi-process runs."""
    _install(session, "test")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy on the three packages and the benchmarks."""
    _install(session, "dev")
    _lint(session)


def _lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", *PACKAGES)
    session.run("mypy", "benchmarks")  # scripts: their own run, `_common` found beside them


@nox.session(python="3.11")
@nox.parametrize("numpy", ["1.26.4", "2.4.6"])
def core(session: nox.Session, numpy: str) -> None:
    """The NumPy core alone (no torch installed) across numpy 1.x and 2.x."""
    session.install(f"numpy=={numpy}", "pytest", "hypothesis")
    session.install("--no-deps", "-e", ".")
    session.run("pytest", "tests/core", "adalora_core")


@nox.session(python="3.11")
@nox.parametrize(
    ("transformers", "peft"),
    [("4.57.6", "0.17.1"), ("5.24.0", "0.21.2")],
    ids=["tf4-peft017", "tf5-peft021"],
)
def compat(session: nox.Session, transformers: str, peft: str) -> None:
    """The torch and HF tests against older and newer transformers / peft."""
    _install(session, "test", f"transformers=={transformers}", f"peft=={peft}")
    session.run("pytest", "-m", "not slow", "tests/torch", "tests/hf", env={"OMP_NUM_THREADS": "1"})


@nox.session(python=["3.10", "3.12", "3.13"])
def other_pythons(session: nox.Session) -> None:
    """Other interpreters, where present (skipped when absent)."""
    _install(session, "test")
    session.run("pytest", "-m", "not slow", env={"OMP_NUM_THREADS": "1"})


@nox.session(python=False)
def clean(session: nox.Session) -> None:
    """Remove nox's virtual environments."""
    shutil.rmtree(".nox", ignore_errors=True)
