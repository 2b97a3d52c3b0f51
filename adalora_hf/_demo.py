"""``adalora demo``: AdaLoRA against LoRA and a linear head, offline, in seconds on a CPU.

The setting is transfer learning in miniature. A tiny ViT (8×8 greyscale images, 2×2 patches)
is pretrained from scratch on scikit-learn's handwritten digits 0-4 (the data ships with
scikit-learn, nothing is downloaded) and cached. Its backbone is then frozen and adapted to the
*other* digits, 5-9, with a new classification head, three ways:

a) AdaLoRA through the library's own API (``AdaLoraConfig`` + ``AdaLoraModel``,
   ``update_and_allocate`` after every optimizer step), on every linear layer of the encoder;
b) plain LoRA at the same final number of adapter parameters (rank ``target_r`` everywhere);
c) the new head alone (a linear probe).

All three see the same batches in the same order, with the same optimizer and learning rate,
and are scored on the same held-out half of digits 5-9.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ._inspect import AdapterSummary, plot_rank_heatmap, read_adapter

if TYPE_CHECKING:
    from ._config import AdaLoraConfig

__all__ = [
    "TINY_RECIPE",
    "DemoResult",
    "DemoSettings",
    "MethodResult",
    "Recipe",
    "default_cache_dir",
    "plot_budget_and_loss",
    "pretrained_backbone",
    "resolve_device",
    "run_demo",
    "target_modules",
]

_NUM_CLASSES = 5  # digits 0-4 for pretraining, 5-9 (relabelled 0-4) for adaptation


@dataclass(frozen=True)
class Recipe:
    """How the pretrained backbone is built; its hash names the cache entry."""

    hidden_size: int = 48
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # = hidden_size: every adapted matrix is square, so one triplet costs the same number of
    # parameters in every matrix and LoRA at rank target_r matches AdaLoRA's final budget.
    intermediate_size: int = 48
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    seed: int = 0  # pretraining is fixed: --seed changes only the adaptation

    def key(self) -> str:
        """A short hash of the recipe and the transformers version (its save format)."""
        import transformers

        blob = json.dumps({**asdict(self), "transformers": transformers.__version__, "v": 1})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A recipe for tests: seconds instead of tens of seconds.
TINY_RECIPE = Recipe(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    pretrain_steps=40,
)


@dataclass(frozen=True)
class DemoSettings:
    """Adaptation hyperparameters, shared by the three methods where they apply."""

    steps: int = 300  # optimizer steps per method (AdaLoRA's total_step)
    batch_size: int = 32
    lr: float = 1e-2  # AdamW, linear decay to 0; the same for every method
    init_r: int = 8  # AdaLoRA: rank of every matrix at the start
    target_r: int = 4  # AdaLoRA: average final rank; LoRA's rank
    scale: float = 2.0  # both adapters multiply their update by this (AdaLoRA: lora_alpha/init_r)
    tinit_frac: float = 0.1  # warm-up steps as a fraction of steps
    tfinal_frac: float = 0.2  # final steps as a fraction of steps
    deltaT: int = 10  # steps between allocations
    orth_reg_weight: float = 0.5
    test_size: float = 0.5  # held-out share of digits 5-9

    @property
    def lora_alpha(self) -> float:
        """AdaLoRA's ``lora_alpha``: its update is scaled by ``lora_alpha / init_r = scale``."""
        return self.scale * self.init_r

    @property
    def tinit(self) -> int:
        """Warm-up steps."""
        return max(1, int(self.steps * self.tinit_frac))

    @property
    def tfinal(self) -> int:
        """Final steps with fixed ranks."""
        return max(1, int(self.steps * self.tfinal_frac))

    def adalora_config(self, **extra: Any) -> AdaLoraConfig:
        """The ``AdaLoraConfig`` of these settings (``extra``: targets and the like); raises
        ``ValueError`` for settings AdaLoRA refuses."""
        from ._config import AdaLoraConfig

        return AdaLoraConfig(
            init_r=self.init_r,
            target_r=self.target_r,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.deltaT,
            total_step=self.steps,
            orth_reg_weight=self.orth_reg_weight,
            lora_alpha=self.lora_alpha,
            **extra,
        )


@dataclass
class MethodResult:
    """One row of the table."""

    method: str
    accuracy: float
    adapter_params: int  # adapter parameters at the end (after AdaLoRA's pruning)
    head_params: int
    trained_params: int  # parameters with requires_grad during training
    seconds: float
    losses: list[float] = field(default_factory=list)  # cross-entropy per step


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote."""

    rows: list[MethodResult]
    budgets: list[int]
    settings: DemoSettings
    recipe: Recipe
    pretrain_accuracy: float
    pretrain_cached: bool
    out: Path
    adapter: AdapterSummary
    reloaded_accuracy: float  # the saved adapter reloaded onto the backbone

    def table(self) -> str:
        """The results as a plain-text table."""
        head = (
            f"{'method':<8}  {'test acc':>8}  {'adapter params':>14}  {'head params':>11}  "
            f"{'trained params':>14}  {'time (s)':>8}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.method:<8}  {r.accuracy:>8.4f}  {r.adapter_params:>14,}  "
                f"{r.head_params:>11,}  {r.trained_params:>14,}  {r.seconds:>8.1f}"
            )
        return "\n".join(lines)


# -- data -----------------------------------------------------------------------------------


@dataclass
class _Split:
    x: torch.Tensor  # (n, 1, 8, 8), float32 in [0, 1]
    y: torch.Tensor  # (n,), int64 in [0, 5)


def _digits(device: torch.device, seed: int, test_size: float) -> dict[str, _Split]:
    """Digits 0-4 (pretraining: train / held-out) and 5-9 (adaptation: train / test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]  # (1797, 1, 8, 8)
    y = digits.target
    old, new = y < _NUM_CLASSES, y >= _NUM_CLASSES
    # the pretraining split is part of the recipe (seed 0), the adaptation split follows --seed
    po_x, pt_x, po_y, pt_y = train_test_split(
        x[old], y[old], test_size=0.2, stratify=y[old], random_state=0
    )
    ao_x, at_x, ao_y, at_y = train_test_split(
        x[new], y[new] - _NUM_CLASSES, test_size=test_size, stratify=y[new], random_state=seed
    )

    def split(a: Any, b: Any) -> _Split:
        return _Split(torch.tensor(a, device=device), torch.tensor(b, device=device))

    return {
        "pretrain": split(po_x, po_y),
        "pretrain_test": split(pt_x, pt_y),
        "train": split(ao_x, ao_y),
        "test": split(at_x, at_y),
    }


def _batches(data: _Split, batch_size: int, steps: int, seed: int) -> Iterator[_Split]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.y), (batch_size,), generator=generator)
        idx = idx.to(data.y.device)
        yield _Split(data.x[idx], data.y[idx])


@torch.no_grad()
def _accuracy(model: nn.Module, data: _Split) -> float:
    was_training = model.training
    model.eval()
    logits = model(pixel_values=data.x).logits
    model.train(was_training)
    return float((logits.argmax(-1) == data.y).float().mean())


# -- the pretrained backbone ----------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$ADALORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/adalora``, else ``~/.cache/adalora``."""
    if os.environ.get("ADALORA_CACHE_DIR"):
        return Path(os.environ["ADALORA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adalora"


def _vit(recipe: Recipe) -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = _NUM_CLASSES
    return ViTForImageClassification(config)


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None hides the bar when stderr is not a terminal (logs, CI)
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if enabled else True)


def _pretrain(recipe: Recipe, data: dict[str, _Split], progress: bool) -> Any:
    torch.manual_seed(recipe.seed)
    model = _vit(recipe).to(data["pretrain"].x.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.pretrain_lr, total_steps=recipe.pretrain_steps
    )
    batches = _batches(data["pretrain"], recipe.pretrain_batch, recipe.pretrain_steps, recipe.seed)
    desc = "pretraining ViT on digits 0-4"
    for batch in _progress(batches, recipe.pretrain_steps, desc, progress):
        model(pixel_values=batch.x, labels=batch.y).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model


def pretrained_backbone(
    recipe: Recipe,
    data: dict[str, _Split],
    cache_dir: Path,
    progress: bool = True,
) -> tuple[Any, bool]:
    """The pretrained ViT from ``cache_dir/<recipe hash>``, built and saved there when missing.

    Returns the model (on the device of ``data``) and whether it came from the cache.
    """
    from transformers import ViTForImageClassification

    entry = cache_dir / f"vit-digits04-{recipe.key()}"
    device = data["pretrain"].x.device
    if (entry / "config.json").is_file():
        try:
            loaded: Any = ViTForImageClassification.from_pretrained(entry, output_loading_info=True)
            model, info = loaded
            if not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
                return model.to(device), True
        except (OSError, ValueError, RuntimeError):
            pass  # a broken entry is rebuilt below
    model = _pretrain(recipe, data, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # write into a temporary directory and rename it, so a concurrent run never reads half a file
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(entry, ignore_errors=True)
    try:
        tmp.rename(entry)
    except OSError:  # another process won the race; its entry is equally good
        shutil.rmtree(tmp, ignore_errors=True)
    return model, False


# -- plain LoRA -----------------------------------------------------------------------------


class _LoRALinear(nn.Module):
    """Plain LoRA (Hu et al. 2021): ``y = base(x) + x Aᵀ Bᵀ · alpha / r``, B = 0 at the start.

    Written here rather than taken from PEFT (a test-only dependency) or built from our SVD
    layers without allocation: the baseline should be LoRA as people use it (PEFT's LoRA init
    and scaling: A Kaiming-uniform, B zero), not AdaLoRA's parametrisation minus allocation. It
    has ``r·(in + out)`` parameters against ``r·(in + out + 1)`` per AdaLoRA triplet set, which
    on the demo's 48×48 matrices is 1% fewer at the same total rank.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def _encoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every ``nn.Linear`` in the encoder (not the head)."""
    found = []
    for parent_name, parent in model.named_modules():
        if parent_name.startswith("classifier"):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name != "classifier":
                found.append((parent, name, child))
    return found


def target_modules(model: nn.Module) -> list[str]:
    """The names of the encoder's linear layers (transformers 4: query, key, value, dense;
    transformers 5: q_proj, k_proj, v_proj, o_proj, fc1, fc2)."""
    return sorted({name for _, name, _ in _encoder_linears(model)})


# -- fine-tuning ----------------------------------------------------------------------------


def _new_head(model: Any, seed: int) -> None:
    torch.manual_seed(seed)
    old = model.classifier
    model.classifier = nn.Linear(old.in_features, _NUM_CLASSES).to(old.weight.device)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _train(
    model: nn.Module,
    data: dict[str, _Split],
    settings: DemoSettings,
    seed: int,
    desc: str,
    progress: bool,
    after_step: Callable[[int], None] | None = None,
) -> tuple[list[float], float]:
    """AdamW with linear decay on the trainable parameters; returns per-step CE and seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / settings.steps)
    losses = []
    model.train()
    start = time.perf_counter()
    batches = _batches(data["train"], settings.batch_size, settings.steps, seed + 1)
    for step, batch in enumerate(_progress(batches, settings.steps, desc, progress), start=1):
        out = model(pixel_values=batch.x, labels=batch.y)
        out.loss.backward()  # AdaLoRA: cross-entropy + orth_reg_weight · orthogonal penalty
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)  # steps 1..total_step, as AdaLoraCallback counts them
        optimizer.zero_grad()
        losses.append(float(F.cross_entropy(out.logits.detach(), batch.y)))
    if data["train"].x.is_cuda:
        torch.cuda.synchronize()
    return losses, time.perf_counter() - start


def _run_head(
    base: nn.Module, data: dict[str, _Split], s: DemoSettings, seed: int, pb: bool
) -> MethodResult:
    model = _fresh(base, seed)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    trained = _count(p for p in model.parameters() if p.requires_grad)
    losses, seconds = _train(model, data, s, seed, "head only", pb)
    head = _count(model.classifier.parameters())
    return MethodResult("head", _accuracy(model, data["test"]), 0, head, trained, seconds, losses)


def _run_lora(
    base: nn.Module, data: dict[str, _Split], s: DemoSettings, seed: int, pb: bool
) -> MethodResult:
    model = _fresh(base, seed)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    adapter = 0
    for parent, name, layer in _encoder_linears(model):
        wrapped = _LoRALinear(layer, s.target_r, s.scale * s.target_r)
        setattr(parent, name, wrapped)
        adapter += _count([wrapped.lora_A, wrapped.lora_B])
    model.classifier.requires_grad_(True)
    trained = _count(p for p in model.parameters() if p.requires_grad)
    losses, seconds = _train(model, data, s, seed, f"LoRA r={s.target_r}", pb)
    head = _count(model.classifier.parameters())
    return MethodResult(
        "LoRA", _accuracy(model, data["test"]), adapter, head, trained, seconds, losses
    )


def _fresh(base: nn.Module, seed: int) -> Any:
    model = copy.deepcopy(base)
    _new_head(model, seed)
    return model


def _current_budget(model: nn.Module, returned: object) -> int | None:
    """The allocator's budget after ``update_and_allocate``: its return value, else
    ``model.rankallocator.budget``; None when neither is there."""
    if isinstance(returned, int):
        return returned
    budget = getattr(getattr(model, "rankallocator", None), "budget", None)
    return budget if isinstance(budget, int) else None


def _run_adalora(
    base: nn.Module,
    data: dict[str, _Split],
    s: DemoSettings,
    seed: int,
    pb: bool,
    out: Path,
) -> tuple[MethodResult, list[int], AdapterSummary, float]:
    from adalora_core import budget_schedule

    from . import AdaLoraModel

    model = _fresh(base, seed)
    targets = target_modules(model)
    config = s.adalora_config(target_modules=targets, modules_to_save=["classifier"])
    torch.manual_seed(seed)
    ada = AdaLoraModel(model, config, adapter_name="default")
    trained = _count(p for p in ada.parameters() if p.requires_grad)
    n = len(_encoder_linears(base))
    budgets: list[int] = []

    def after_step(step: int) -> None:
        budget = _current_budget(ada, ada.update_and_allocate(step))
        if budget is None:  # allocator not reachable: the schedule it follows
            budget, _ = budget_schedule(
                step,
                init_budget=s.init_r * n,
                target_budget=s.target_r * n,
                tinit=s.tinit,
                tfinal=s.tfinal,
                total_step=s.steps,
                deltaT=s.deltaT,
            )
        budgets.append(int(budget))

    losses, seconds = _train(
        ada, data, s, seed, f"AdaLoRA r {s.init_r}->{s.target_r}", pb, after_step
    )
    accuracy = _accuracy(ada, data["test"])
    adapter_dir = out / "adalora-adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    ada.save_pretrained(adapter_dir)
    summary = read_adapter(adapter_dir)
    # the saved files alone reproduce the model: reload onto a fresh copy of the backbone
    reloaded = AdaLoraModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    reloaded_accuracy = _accuracy(reloaded, data["test"])
    head = sum(summary.other_params.values())  # the saved classifier (modules_to_save)
    row = MethodResult("AdaLoRA", accuracy, summary.adapter_params, head, trained, seconds, losses)
    return row, budgets, summary, reloaded_accuracy


# -- plots ----------------------------------------------------------------------------------


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_budget_and_loss(result: DemoResult, path: Path) -> Path:
    """Two panels over the AdaLoRA run: the rank budget (with its phases) and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.settings
    steps = list(range(1, len(result.budgets) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    top.step(steps, result.budgets, where="post", color="tab:blue", label="budget (triplets)")
    for ax in (top, bottom):
        ax.axvspan(0, s.tinit, color="0.92", zorder=0)
        ax.axvspan(s.steps - s.tfinal, s.steps, color="0.92", zorder=0)
        ax.grid(alpha=0.3)
    top.text(
        s.tinit / 2,
        0.5,
        "warm-up",
        transform=top.get_xaxis_transform(),
        ha="center",
        rotation=90,
        color="0.4",
    )
    top.text(
        s.steps - s.tfinal / 2,
        0.5,
        "final",
        transform=top.get_xaxis_transform(),
        ha="center",
        rotation=90,
        color="0.4",
    )
    top.set_ylabel("total rank (triplets)")
    top.set_title(
        f"AdaLoRA budget: init_r={s.init_r} → target_r={s.target_r}, tinit={s.tinit}, "
        f"tfinal={s.tfinal}, deltaT={s.deltaT}",
        fontsize=10,
    )
    window = max(1, s.steps // 30)
    colours = {"AdaLoRA": "tab:blue", "LoRA": "tab:orange", "head": "tab:green"}
    for row in result.rows:
        colour = colours.get(row.method)
        bottom.plot(steps[: len(row.losses)], row.losses, color=colour, alpha=0.2, lw=0.8)
        bottom.plot(
            steps[: len(row.losses)],
            _smooth(row.losses, window),
            color=colour,
            label=f"{row.method} (test acc {row.accuracy:.3f})",
        )
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel(f"training cross-entropy\n(mean of {window} steps)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the whole demo -------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error when there is none) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}.")
    return torch.device(name)


def run_demo(
    *,
    settings: DemoSettings,
    seed: int = 0,
    out: Path = Path("adalora-demo"),
    device: str = "auto",
    recipe: Recipe | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Pretrain (or load) the backbone, fine-tune it three ways, write adapter, plots, results.

    On CPU, torch runs single-threaded while the demo runs (restored afterwards): the matrices
    are 48×48, so threads only add overhead, and float sums, hence the numbers, would otherwise
    depend on the number of cores.
    """
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run_demo(
            settings, seed, Path(out), dev, recipe or Recipe(), cache_dir, progress, log
        )
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    settings: DemoSettings,
    seed: int,
    out: Path,
    dev: torch.device,
    recipe: Recipe,
    cache_dir: Path | None,
    progress: bool,
    log: Callable[[str], None],
) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = _digits(dev, seed, settings.test_size)
    cache = cache_dir or default_cache_dir()
    base, cached = pretrained_backbone(recipe, data, cache, progress)
    base.requires_grad_(False)
    pre_acc = _accuracy(base, data["pretrain_test"])
    log(
        f"backbone: ViT {recipe.num_hidden_layers} layers x {recipe.hidden_size} wide, "
        f"{_count(base.parameters()):,} parameters, pretrained on digits 0-4 "
        f"({'cached' if cached else 'built now'}; held-out accuracy {pre_acc:.4f})"
    )
    log(
        f"task: digits 5-9, {len(data['train'].y)} training / {len(data['test'].y)} test "
        f"images, {settings.steps} steps, seed {seed}, device {dev}"
    )
    ada, budgets, summary, reloaded = _run_adalora(base, data, settings, seed, progress, out)
    log(
        f"AdaLoRA adapter saved and reloaded with AdaLoraModel.from_pretrained: test accuracy "
        f"{reloaded:.4f} ({'identical' if reloaded == ada.accuracy else 'DIFFERENT'})"
    )
    lora = _run_lora(base, data, settings, seed, progress)
    head = _run_head(base, data, settings, seed, progress)
    result = DemoResult(
        rows=[ada, lora, head],
        budgets=budgets,
        settings=settings,
        recipe=recipe,
        pretrain_accuracy=pre_acc,
        pretrain_cached=cached,
        out=out,
        adapter=summary,
        reloaded_accuracy=reloaded,
    )
    ranks = {m.name: m.rank for m in summary.modules}
    plot_rank_heatmap(
        ranks,
        out / "ranks.png",
        init_r=settings.init_r,
        title=f"AdaLoRA final rank per layer and module ({summary.total_rank} of "
        f"{settings.init_r * len(ranks)} triplets kept)",
    )
    plot_budget_and_loss(result, out / "budget_loss.png")
    (out / "results.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "settings": asdict(settings),
                "recipe": asdict(recipe),
                "pretrain_accuracy": pre_acc,
                "reloaded_accuracy": reloaded,
                "rows": [
                    {k: v for k, v in asdict(r).items() if k != "losses"} for r in result.rows
                ],
                "rank_pattern": ranks,
            },
            indent=2,
        )
    )
    return result
