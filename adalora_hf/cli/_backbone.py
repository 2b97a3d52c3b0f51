"""The demo's pretrained backbone: the tiny ViT recipe, its pretraining on digits 0-4, and the
cache entry (named by the recipe's hash) it is saved in and loaded from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ._data import NUM_CLASSES, Split, batches, progress_bar

__all__ = ["TINY_RECIPE", "Recipe", "default_cache_dir", "pretrained_backbone"]


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
    config.num_labels = NUM_CLASSES
    return ViTForImageClassification(config)


def _pretrain(recipe: Recipe, data: dict[str, Split], show_progress: bool) -> Any:
    torch.manual_seed(recipe.seed)
    model = _vit(recipe).to(data["pretrain"].x.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.pretrain_lr, total_steps=recipe.pretrain_steps
    )
    seeded = batches(data["pretrain"], recipe.pretrain_batch, recipe.pretrain_steps, recipe.seed)
    desc = "pretraining ViT on digits 0-4"
    for batch in progress_bar(seeded, recipe.pretrain_steps, desc, show_progress):
        model(pixel_values=batch.x, labels=batch.y).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model


def pretrained_backbone(
    recipe: Recipe,
    data: dict[str, Split],
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
