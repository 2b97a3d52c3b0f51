"""Test matrix. `nox -s tests` is the default session; `nox -l` lists them all.

Every session installs torch through `constraints.txt` (the CPU build pinned there), so no
session pulls a multi-GB CUDA wheel. Set ADALORA_TORCH_SPEC (e.g. "torch==2.14.1") to try
another torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def _find_pyenv_pythons(versions: list[str]) -> None:
    """Put pyenv's interpreters for ``versions`` on PATH, ahead of its shims (which answer
    "command not found" for a version that is installed but not selected). Versions that
    pyenv lacks stay absent, and nox skips their sessions; without pyenv nothing changes."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = []
    for version in versions:
        candidates = sorted(
            root.glob(f"{version}.*/bin/python{version}"),
            key=lambda p: [int(x) if x.isdigit() else -1 for x in p.parts[-3].split(".")],
        )
        if candidates:
            found.append(str(candidates[-1].parent))
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_find_pyenv_pythons(PYTHONS)

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


# the numpy release each core session installs, per major version and Python: numpy 2.3+
# needs Python 3.11, and numpy 1.x has no wheels for Python 3.13
CORE_NUMPY = {
    "1": {"3.10": "1.26.4", "3.11": "1.26.4", "3.12": "1.26.4"},
    "2": {"3.10": "2.2.6", "3.11": "2.4.6", "3.12": "2.4.6", "3.13": "2.4.6"},
}


@nox.session(python=PYTHONS)
@nox.parametrize("numpy", list(CORE_NUMPY))
def core(session: nox.Session, numpy: str) -> None:
    """The NumPy core alone (no torch installed) across numpy 1.x and 2.x, Python 3.10-3.13
    (each interpreter where present)."""
    version = CORE_NUMPY[numpy].get(str(session.python))
    if version is None:
        session.skip(f"numpy {numpy}.x has no release for Python {session.python}")
    session.install(f"numpy=={version}", "pytest", "hypothesis")
    session.install("--no-deps", "-e", ".")
    session.run("pytest", "tests/core", "adalora_core", "tests/jax")  # tests/jax: skips cleanly


@nox.session(python="3.11")
def jax(session: nox.Session) -> None:
    """The JAX tests: the core called from JAX, save_adapter_arrays, and docs/jax.md run end to
    end (trained in JAX, served in torch; slow tests included)."""
    _install(session, "test,jax")
    session.run("pytest", "tests/jax", *session.posargs, env={"OMP_NUM_THREADS": "1"})


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
