"""Shared by the multi-process tests and their worker scripts: a tiny torch model, the global
batches, the launcher (``python -m torch.distributed.run``) and JSON/safetensors helpers.

Workers are launched on CPU with gloo, two processes, one thread each. Each rank writes its
results into the output directory as ``rank<k>.json`` (+ ``.safetensors``); the test process
compares them with each other and with a single process trained on the same global batches.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parent

# The short schedule every multi-process test uses: 12 steps, warm-up 2, final 3, every 2 steps
# (allocations at steps 4, 6, 8 with budgets 13, 11, 10, and the final one at 9).
SCHEDULE = {"target_r": 2, "tinit": 2, "tfinal": 3, "total_step": 12, "deltaT": 2}
INIT_R = 4
GLOBAL_BATCH = 8
D = 8


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.v(torch.tanh(self.q(h))))


class Net(nn.Module):
    """Two blocks (q, v, norm) and a head: five adapted matrices (``layers.<i>.q|v``, ``head``),
    20 triplets at rank 4, target budget 10."""

    def __init__(self, d: int = D, n_layers: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)  # (batch, seq, d)
        return self.head(x)  # (batch, seq, n_out)


def build_net(seed: int = 0) -> Net:
    """The tiny model with rank-4 SVD adapters on q, v and head, in float64 (so that rounding
    differences between one and two processes cannot flip a mask), adapters trainable only."""
    from adalora_torch import inject_adapters, mark_only_adapters_trainable

    torch.manual_seed(seed)
    model = Net()
    inject_adapters(model, ["q", "v", "head"], rank=INIT_R, alpha=8.0)
    mark_only_adapters_trainable(model)
    return model.double()


class WithLoss(nn.Module):
    """The training loss inside ``forward``, so the orthogonal penalty reads the parameters
    while FSDP has them unsharded (as ``AdaLoraModel.forward`` does)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from adalora_torch import orthogonal_penalty

        loss = nn.functional.mse_loss(self.net(x), y)
        return loss + 0.1 * orthogonal_penalty(self.net)


def global_batch(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (``GLOBAL_BATCH`` rows) of ``step`` (micro-batch ``micro`` when
    accumulating), the same in every process."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, 5, D, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 5, 3, generator=g, dtype=torch.float64)
    return x, y


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of this rank: the concatenation over ranks is ``t``."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 180,
    launcher: str = "torchrun",
    cwd: Path | None = None,
    allow_exit_abort: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (a path, or a name in tests/_dist_scripts) in ``nproc`` CPU processes
    and return the finished process; raise with its output when it fails.

    ``launcher="torchrun"``: ``python -m torch.distributed.run --nproc_per_node N`` (what the
    ``torchrun`` command runs); ``"accelerate"``: ``python -m accelerate.commands.launch
    --multi_gpu --num_processes N`` (``accelerate launch``; on a machine without GPUs it starts
    CPU processes, and the script picks gloo).

    ``allow_exit_abort``: accept a run whose only failure is torch's abort at interpreter exit
    (see :func:`finish`), for scripts that end normally (the documented examples); the caller
    then checks that everything the script should have written is there.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # in case the test itself runs under a launcher
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    port = str(free_port())
    if launcher == "torchrun":
        head = ["torch.distributed.run", "--nproc_per_node", str(nproc)]
        head += ["--master_addr", "127.0.0.1", "--master_port", port]
    elif launcher == "accelerate":
        head = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc)]
        head += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        head += ["--main_process_port", port]
    else:
        raise ValueError(launcher)
    cmd = [sys.executable, "-m", *head, str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0 and not (allow_exit_abort and _only_exit_abort(proc)):
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


def _only_exit_abort(proc: subprocess.CompletedProcess[str]) -> bool:
    # torchrun's summary: the aborted rank exits with -6 (SIGABRT), the others -15 (SIGTERM
    # from the agent) or 0; a Python exception in a worker would exit with 1
    err = proc.stderr
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", err))
    return "terminate called without an active exception" in err and codes <= {"-6", "-15", "0"}


def finish() -> None:
    """End a worker: wait for the others, leave the process group, exit at once.

    With torch 2.13 (CPU, gloo) a process that ran DDP or FSDP2 sometimes aborts during
    interpreter shutdown, after ``destroy_process_group`` returned and every result was written
    ("terminate called without an active exception", no Python frame); a plain DDP script
    without adalora does it too. ``os._exit`` skips that teardown.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def doc_script(name: str) -> str:
    """The ```python block of docs/distributed.md whose first line is ``# <name>...``."""
    text = (SCRIPTS.parents[1] / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    found = [b for b in blocks if b.startswith(f"# {name}")]
    if len(found) != 1:
        raise LookupError(f"docs/distributed.md has {len(found)} blocks for {name}")
    return found[0]


def write_json(path: Path | str, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, E, B of every SVD layer by ``<module>.lora_A|lora_E|lora_B`` (inner names)."""
    from adalora_torch import SVDAdapter
    from adalora_torch._distributed import unwrap_model

    out = {}
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, SVDAdapter):
            for kind in ("lora_A", "lora_E", "lora_B"):
                t = getattr(m, kind)["default"].detach()
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                out[f"{name}.{kind}"] = full.clone().contiguous()
    return out
