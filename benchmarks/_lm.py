"""The language-modelling task of ``benchmarks/quality.py``: a byte-level GPT-2 pretrained on
English documentation, adapted to Python source, scored in bits per byte on held-out source.

Data (nothing is downloaded; both texts ship with every CPython install):

* pretraining: ``pydoc_data.topics`` (the English reference text ``help()`` prints, ~465 kB);
* adaptation: the source of a fixed list of standard-library modules (``SOURCE_MODULES``,
  ~600 kB of Python); the last 10% of every file is held out for the test.

English prose to Python source is a clear change of distribution (indentation, identifiers,
operators) on the same byte alphabet, so the frozen model has something to learn and a
continuous metric to show it in: bits per byte (cross-entropy in base 2 per byte) of the
adapted model on held-out source, lower is better.

The model is transformers' ``GPT2LMHeadModel`` (256-byte vocabulary, 4 layers, width 64,
context 64), pretrained here once and cached (``~/.cache/adalora`` or ``$ADALORA_CACHE_DIR``,
named by the recipe's hash). Adapters go on ``c_attn``, ``c_proj`` and ``c_fc`` of every
block (transformers' ``Conv1D``): 16 matrices of shapes 64x192, 64x64, 64x256 and 256x64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["c_attn", "c_proj", "c_fc"]
SOURCE_MODULES = [
    "argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py", "textwrap.py",
    "pathlib.py", "shutil.py", "configparser.py", "csv.py", "difflib.py", "pprint.py",
]  # fmt: skip


@dataclass(frozen=True)
class LMRecipe:
    """The pretrained byte-level GPT-2; its hash names the cache entry."""

    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    block: int = 64  # context length in bytes
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        import transformers

        blob = json.dumps({**asdict(self), "transformers": transformers.__version__, "v": 1})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def english_docs() -> torch.Tensor:
    """The bytes of ``pydoc_data.topics``, topics in sorted order, as an int64 tensor."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def python_source() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) bytes of ``SOURCE_MODULES``: the first 90% / last 10% of each file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, test = bytearray(), bytearray()
    for name in SOURCE_MODULES:
        data = (stdlib / name).read_bytes()
        cut = int(len(data) * 0.9)
        train += data[:cut]
        test += data[cut:]
    return (
        torch.tensor(list(train), dtype=torch.int64),
        torch.tensor(list(test), dtype=torch.int64),
    )


def batch(data: torch.Tensor, size: int, block: int, g: torch.Generator) -> torch.Tensor:
    """``size`` random windows of ``block`` bytes."""
    start = torch.randint(0, len(data) - block, (size,), generator=g)
    return torch.stack([data[s : s + block] for s in start.tolist()])


def _gpt2(recipe: LMRecipe) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=recipe.block,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def pretrained_lm(recipe: LMRecipe, cache_dir: Path, log: Callable[[str], None]) -> Any:
    """The byte-level GPT-2 pretrained on ``english_docs()``, from the cache or built now."""
    from transformers import GPT2LMHeadModel

    entry = cache_dir / f"gpt2-bytes-docs-{recipe.key()}"
    if (entry / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(entry)
    torch.manual_seed(recipe.seed)
    model = _gpt2(recipe)
    data = english_docs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.pretrain_lr, total_steps=recipe.pretrain_steps
    )
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(1, recipe.pretrain_steps + 1):
        x = batch(data, recipe.pretrain_batch, recipe.block, g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0:
            log(f"pretraining step {step}: {loss.item() / math.log(2):.3f} bits/byte")
    model.save_pretrained(entry, safe_serialization=True)
    return model


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: torch.Tensor, block: int, limit: int = 256) -> float:
    """Mean next-byte cross-entropy in bits over up to ``limit`` consecutive windows of
    ``data`` (the first byte of each window is context only), on the model's device."""
    was = model.training
    model.eval()
    n = min(limit, len(data) // block)
    x = data[: n * block].view(n, block).to(next(model.parameters()).device)
    total = 0.0
    for chunk in x.split(64):
        logits = model(input_ids=chunk).logits[:, :-1]
        total += float(
            F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum")
        )
    model.train(was)
    return total / (n * (block - 1)) / math.log(2)


def adapt(
    model: nn.Module,
    train: torch.Tensor,
    seed: int,
    steps: int,
    batch_size: int,
    block: int,
    lr: float,
    after_step: Callable[[int], Any] | None,
) -> None:
    """AdamW (linear decay) on what requires grad, on seeded windows of ``train`` (moved to
    the device of those parameters); the loss is the model's own (AdaLoRA's includes the
    orthogonal penalty where its path adds it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / steps)
    g = torch.Generator().manual_seed(seed + 1)
    device = params[0].device
    model.train()
    for step in range(1, steps + 1):
        x = batch(train, batch_size, block, g).to(device)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        decay.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()


@dataclass(frozen=True)
class LMSettings:
    """Adaptation settings of the LM task. AdaLoRA's schedule is the recommended one of
    ``docs/tuning.md`` (``tinit`` 10%, ``tfinal`` 20% of the steps, ``deltaT`` 10), the
    ranks those of the demo's budget ratio (init_r 3x target_r)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-3  # AdamW, linear decay; the same for every method of the main rows
    init_r: int = 12
    target_r: int = 4
    scale: float = 2.0  # LoRA alpha / r = AdaLoRA lora_alpha / init_r

    def adalora(self, orth: float, peft_schedule: bool = False) -> dict[str, Any]:
        """AdaLoraConfig arguments: recommended schedule, or PEFT's defaults (tinit 0,
        tfinal 0, deltaT 1)."""
        schedule = (
            {"tinit": 0, "tfinal": 0, "deltaT": 1}
            if peft_schedule
            else {"tinit": self.steps // 10, "tfinal": self.steps // 5, "deltaT": 10}
        )
        return dict(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.scale * self.init_r,
            total_step=self.steps, orth_reg_weight=orth, target_modules=TARGETS, **schedule,
        )  # fmt: skip


def _shape(layer: Any) -> tuple[int, int]:
    w = layer.weight
    return (int(w.shape[0]), int(w.shape[1]))  # Conv1D: (in, out)


def frozen_copy(base: nn.Module, seed: int) -> Any:
    """A frozen copy of ``base``, with torch's generator seeded for the adapters to come."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    return model


def add_lora(model: nn.Module, ranks: Mapping[str, int], scale: float) -> int:
    """Wrap every target matrix whose path has a rank > 0 in ``ranks`` in LoRA (alpha
    ``scale * r``); returns the LoRA parameters added."""
    from adalora_hf.cli._lora import LoRALinear

    params = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            r = ranks.get(f"{name}.{child_name}", 0)
            if child_name in TARGETS and r > 0:
                setattr(parent, child_name, LoRALinear(child, r, scale * r))
                params += r * sum(_shape(child))
    return params


def target_paths(model: nn.Module) -> list[str]:
    """The paths of the target matrices, as ``add_lora`` names them."""
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in TARGETS]


def kept_ranks(model: nn.Module) -> dict[str, int]:
    """Triplets an AdaLoRA adapter ("default") keeps per matrix (nonzero E)."""
    from adalora_torch._layers import iter_svd_layers

    return {p: int((m.lora_E["default"] != 0).sum()) for p, m in iter_svd_layers(model)}


def adalora_params(model: nn.Module) -> int:
    """AdaLoRA's adapter parameters after pruning: ``(in + out + 1)`` per kept triplet."""
    from adalora_torch._layers import iter_svd_layers

    fans = {p: sum(_shape(m.base_layer)) for p, m in iter_svd_layers(model)}
    return sum(r * (fans[p] + 1) for p, r in kept_ranks(model).items())


def lm_runs(
    base: Any,
    seed: int,
    s: LMSettings,
    orth_weights: list[float],
    with_peft: bool,
    lr_factors: Sequence[float] = (),
) -> list[tuple[str, float, int]]:
    """(method, test bits per byte, final adapter parameters) of every method on one seed;
    for every factor ``k`` in ``lr_factors`` also AdaLoRA without the penalty and LoRA at both
    ranks at ``k`` times ``s.lr`` (rows suffixed ``lr xk``, see ``lr_suffix``)."""
    import adalora_hf

    train, test = python_source()
    block = base.config.n_positions
    rows: list[tuple[str, float, int]] = []

    def run(model: nn.Module, after: Callable[[int], Any] | None, k: float = 1.0) -> float:
        adapt(model, train, seed, s.steps, s.batch_size, block, k * s.lr, after)
        return bits_per_byte(model, test, block)

    def frozen() -> Any:
        return frozen_copy(base, seed)

    def lora(r: int, k: float = 1.0) -> None:
        model = frozen()
        params = add_lora(model, dict.fromkeys(target_paths(model), r), s.scale)
        rows.append((f"LoRA r={r}{lr_suffix(k)}", run(model, None, k), params))

    rows.append(("frozen", bits_per_byte(base, test, block), 0))
    for r in (s.target_r, s.init_r):
        lora(r)

    def ada_params(ada: Any) -> int:
        return adalora_params(ada.model)

    for orth in orth_weights:
        ada = adalora_hf.AdaLoraModel(frozen(), adalora_hf.AdaLoraConfig(**s.adalora(orth)))
        rows.append((f"AdaLoRA orth={orth}", run(ada, ada.update_and_allocate), ada_params(ada)))
    # PEFT's default schedule, without the penalty as PEFT's plain get_peft_model runs it
    config = adalora_hf.AdaLoraConfig(**s.adalora(0.0, peft_schedule=True))
    ada = adalora_hf.AdaLoraModel(frozen(), config)
    rows.append(("AdaLoRA PEFT schedule", run(ada, ada.update_and_allocate), ada_params(ada)))
    if with_peft:  # the oracle: PEFT's get_peft_model without task_type, recommended schedule
        import peft

        oracle: Any = peft.get_peft_model(frozen(), peft.AdaLoraConfig(**s.adalora(0.5)))
        bpb = run(oracle, oracle.base_model.update_and_allocate)
        rows.append(("PEFT get_peft_model", bpb, ada_params(oracle.base_model)))
    for k in lr_factors:
        ada = adalora_hf.AdaLoraModel(frozen(), adalora_hf.AdaLoraConfig(**s.adalora(0.0)))
        bpb = run(ada, ada.update_and_allocate, k)
        rows.append((f"AdaLoRA orth=0.0{lr_suffix(k)}", bpb, ada_params(ada)))
        for r in (s.target_r, s.init_r):
            lora(r, k)
    return rows


def lr_suffix(k: float) -> str:
    """The suffix of a row trained at ``k`` times the task's learning rate (none for 1)."""
    return "" if k == 1 else f", lr x{k:g}"
