"""The AdaLoRA training hook: importance EMAs on the adapters' device, exact top-k allocation.

Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512, eqs. (8)-(12). The
algorithm is :func:`adalora_core.rank_allocator` (the NumPy specification); this module runs its
phases on the adapters' device (contract: ``docs/design.md``). The flat EMA buffers and the
triplet scores live in ``_buckets`` (``_fsdp`` for FSDP2 shards).

Every call reads A, E, B and their gradients from the layers found at construction and rebuilds
the buffers (carrying the EMAs over) only when a shape, dtype, device or sharding changed.
Non-finite steps: on the CPU the finiteness flag is read on the host and the step skipped; on an
accelerator it is never read (no host sync): it zeroes the EMA weights on the device and feeds a
device counter that ``skipped_steps`` reads on demand.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from adalora_core import (
    allocate,
    budget_schedule,
    require_total_step,
    validate_betas,
    validate_schedule,
)

from ._allocator_state import CONFIG_KEYS, FORMAT, KINDS, check_state
from ._buckets import Bucket, Triplet, check_triplet, fold_importance, keep_dict, saved_ema
from ._distributed import check_masks_agree, unwrap_model
from ._fsdp import ShardedBucket, is_sharded
from ._layers import iter_svd_layers
from ._protocol import SVDAdapter

__all__ = ["RankAllocator"]


def _key(triplets: list[Triplet], sharded: bool) -> list[tuple[Any, ...]]:
    # what the buffers depend on, per matrix: shapes, dtypes, devices, tensor types (a DTensor
    # under FSDP2) and, once sharded, the placements
    return [
        (a.shape, e.shape, b.shape, a.dtype, e.dtype, b.dtype, a.device, e.device, b.device)
        + ((type(e),) if not sharded else (type(e), tuple(e.placements)))  # type: ignore[attr-defined]
        for a, e, b in triplets
    ]


class RankAllocator:
    """Adaptive rank allocation for the SVD adapters of ``model`` (AdaLoRA's training hook).

    Call it once per optimizer step, after ``optimizer.step()`` and before the gradients are
    cleared:

    >>> import torch
    >>> from torch import nn
    >>> from adalora_torch import inject_adapters
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    >>> _ = inject_adapters(model, ["0", "1"], rank=4)
    >>> allocator = RankAllocator(model, target_r=2, tinit=2, tfinal=2, total_step=10)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(10):
    ...     model(torch.randn(8, 4)).square().mean().backward()
    ...     optimizer.step()
    ...     budget, pattern = allocator.update_and_allocate(step)
    ...     optimizer.zero_grad()
    >>> budget, allocator.finalized, sum(map(sum, allocator.rank_pattern.values()))
    (4, True, 4)

    Phases, for ``final = total_step - tfinal`` (``docs/design.md``,
    ``adalora_core.rank_allocator``):

    1) ``step < final``: fold ``|p · ∇p|`` of every A, E, B into the sensitivity and uncertainty
       EMAs (the whole update is skipped, and counted in ``skipped_steps``, when any of it is
       non-finite); the budget follows ``adalora_core.budget_schedule`` (``init_budget`` up to
       ``tinit``, then a cubic decrease), and when the schedule masks, exactly ``budget``
       triplets with the highest scores survive (ties: earlier module, then lower rank index)
       and E of the others is set to 0.
    2) ``step == final`` (or the first call past it): final allocation to
       ``target_budget = target_r · n_matrices``; the EMAs are dropped.
    3) ``step > final``: the recorded masks are re-applied every step (the optimizer moves
       masked E entries).

    Layers are found with ``iter_svd_layers(model, adapter_name)``; after each allocation every
    layer's ``keep[adapter_name]`` holds its boolean keep-mask (shape (r,)). The state lives on
    the adapters' device and follows them when they move or are replaced. ``total_step`` may be
    None until ``set_total_step`` (``AdaLoraCallback`` fills it in).

    Raises ``ValueError`` for settings that cannot work (``target_r`` above the adapters' rank,
    ``tinit >= total_step - tfinal``, betas outside (0, 1), ``deltaT < 1``) and when the model
    has no adapter ``adapter_name``.
    """

    _sync_free: bool | None = None  # skip non-finite steps without a host sync; None: off the CPU
    # under torch.distributed, check at each allocation that all processes keep the same masks
    cross_rank_check: bool = True

    def __init__(
        self,
        model: nn.Module,
        *,
        target_r: int,
        tinit: int = 0,
        tfinal: int = 0,
        total_step: int | None = None,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        adapter_name: str = "default",
    ) -> None:
        if (
            isinstance(target_r, bool)
            or not isinstance(target_r, (int, np.integer))
            or target_r < 0
        ):
            raise ValueError(f"target_r must be an integer >= 0, got {target_r!r}.")
        validate_betas(beta1, beta2)
        self.adapter_name = adapter_name
        self.target_r, self.tinit, self.tfinal, self.deltaT = int(target_r), tinit, tfinal, deltaT
        self.beta1, self.beta2 = float(beta1), float(beta2)

        model = unwrap_model(model)  # DDP: the inner model's names, no "module." prefix
        found = list(iter_svd_layers(model, adapter_name))
        if not found:
            others = sorted({k for _, m in iter_svd_layers(model) for k in m.lora_A})
            raise ValueError(
                f"The model has no SVD adapter layer with adapter {adapter_name!r} (adapters "
                f"found: {others}): inject adapters first (inject_adapters) or pass the right "
                "adapter_name."
            )
        self._names = [n for n, _ in found]
        self._layers: list[SVDAdapter] = [m for _, m in found]
        self._ranks = [int(m.lora_E[adapter_name].shape[0]) for m in self._layers]
        self._offsets = np.concatenate([[0], np.cumsum(self._ranks)]).astype(np.int64)
        self._bounds = list(zip(self._offsets[:-1].tolist(), self._offsets[1:].tolist()))
        self.init_budget = int(sum(self._ranks))
        self.target_budget = self.target_r * len(self._layers)
        self._validate(total_step)
        self._total_step = total_step

        self._step = -1
        self._budget = self.init_budget
        self._finalized = False
        self._rank_pattern: dict[str, list[bool]] | None = None
        self._keep = np.ones(self.init_budget, dtype=bool)  # current keep-mask, all matrices
        self._skipped = 0  # skipped steps already read back from the device
        self._warned: set[str] = set()  # modules already warned about for missing gradients
        self._buckets: list[Bucket | ShardedBucket] = []
        self._skipped_dev: torch.Tensor | None = None
        self._key: list[tuple[Any, ...]] | None = None  # what the buckets were built for
        self._sharded = False  # any FSDP2 (DTensor) bucket
        self._rebuild(self._read(), ema=None)

    # -- configuration ------------------------------------------------------------------------
    def _validate(self, total_step: int | None) -> None:
        validate_schedule(
            init_budget=self.init_budget,
            target_budget=self.target_budget,
            tinit=self.tinit,
            tfinal=self.tfinal,
            total_step=total_step,
            deltaT=self.deltaT,
        )

    @property
    def total_step(self) -> int | None:
        """Number of optimizer steps of the run (None until set)."""
        return self._total_step

    def set_total_step(self, total_step: int) -> None:
        """Set the number of optimizer steps (e.g. from the Trainer's ``max_steps``)."""
        self._validate(require_total_step(total_step))
        self._total_step = int(total_step)

    # -- read-only state ----------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the adapted matrices, in allocation order."""
        return list(self._names)

    @property
    def step(self) -> int:
        """The last step given to ``update_and_allocate`` (-1 before the first)."""
        return self._step

    @property
    def budget(self) -> int:
        """Number of triplets the schedule allows at the last step."""
        return self._budget

    @property
    def finalized(self) -> bool:
        """Whether the final allocation happened (the importance state is gone)."""
        return self._finalized

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The last recorded pattern, module name -> keep-mask (True = kept); None before any."""
        if self._rank_pattern is None:
            return None
        return {k: list(v) for k, v in self._rank_pattern.items()}

    @property
    def skipped_steps(self) -> int:
        """Importance updates skipped because a sensitivity was non-finite (reads the device)."""
        extra = 0 if self._skipped_dev is None else int(self._skipped_dev.item())
        return self._skipped + extra

    # -- the hook -----------------------------------------------------------------------------
    def update_and_allocate(self, step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """Update the importance, allocate the budget at ``step`` and mask E accordingly.

        Returns ``(budget, rank_pattern)``: the pattern (module name -> keep-mask) when an
        allocation happened at this step, else None. Raises ``ValueError``, changing nothing,
        when ``total_step`` is unset, when ``step`` is negative or does not increase, or when
        an importance update is due and no adapter parameter has a gradient. Matrices without
        a gradient while others have one warn once and count as sensitivity 0.
        """
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step must be an integer, got {step!r}.") from None
        total_step = require_total_step(self._total_step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step <= self._step:
            raise ValueError(
                f"step {step} does not follow the last step {self._step}: call "
                "update_and_allocate once per optimizer step with an increasing step (to "
                "resume, load_state_dict the saved allocator state instead of replaying steps)."
            )
        final = total_step - self.tfinal
        triplets = self._read()
        grads: list[tuple[Any, Any, Any]] = []
        missing: list[int] = []
        if step < final and not self._finalized:
            grads = [(a.grad, e.grad, b.grad) for a, e, b in triplets]
            missing = [
                m for m, (x, y, z) in enumerate(grads) if x is None or y is None or z is None
            ]
            if len(missing) == len(grads) and all(g is None for gs in grads for g in gs):
                raise ValueError(
                    f"update_and_allocate({step}) found no gradient on any parameter of "
                    f"adapter {self.adapter_name!r}: call it after loss.backward() and "
                    "optimizer.step(), before optimizer.zero_grad() (which removes the "
                    "gradients it reads). Nothing changed."
                )
        key = _key(triplets, self._sharded)
        if key != self._key:
            self._rebuild(triplets, ema=self._export_ema())
        # 3) final phase: keep the recorded pattern
        if self._finalized:
            self._apply_masks(triplets)
            self._step, self._budget = step, self.target_budget
            return self.target_budget, None
        if step >= final:
            budget, mask_now = self.target_budget, True
        else:
            budget, mask_now = budget_schedule(
                step,
                init_budget=self.init_budget,
                target_budget=self.target_budget,
                tinit=self.tinit,
                tfinal=self.tfinal,
                total_step=total_step,
                deltaT=self.deltaT,
            )
            # 1) importance, only before the final allocation
            self._update_importance(triplets, grads, missing)
        pattern = self._allocate(budget, step, triplets) if mask_now else None
        self._step, self._budget = step, budget
        if step >= final:  # 2) the final allocation: the importance state goes
            for bucket in self._buckets:
                bucket.ema_s = bucket.ema_u = None
            self._finalized = True
        return budget, pattern

    def _read(self) -> list[Triplet]:
        """``(A, E, B)`` of every tracked layer, as the layers hold them now (plain dict
        look-ups: ``ParameterDict[name]`` costs microseconds, hundreds of times a step)."""
        name, out = self.adapter_name, []
        for module, layer in zip(self._names, self._layers):
            a, e, b = (layer._modules[k]._parameters for k in KINDS)  # type: ignore[attr-defined]
            try:
                out.append((a[name], e[name], b[name]))
            except KeyError:
                raise ValueError(
                    f"{module}: adapter {name!r} was removed from this layer; build a new "
                    "RankAllocator for the adapters the model has now."
                ) from None
        return out

    def _update_importance(
        self, triplets: list[Triplet], grads: list[tuple[Any, ...]], missing: list[int]
    ) -> None:
        new = [self._names[m] for m in missing if self._names[m] not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"No gradient for adapter {self.adapter_name!r} of {new} at this step (frozen "
                "or unused): their sensitivity counts as 0.",
                stacklevel=3,
            )
        work = [
            b.sensitivity([triplets[m] for m in b.members], [grads[m] for m in b.members])
            for b in self._buckets
        ]
        assert self._skipped_dev is not None
        sync_free = self._skipped_dev.device.type != "cpu"
        sync_free = sync_free if self._sync_free is None else self._sync_free
        self._skipped += fold_importance(self._buckets, work, self._skipped_dev, sync_free)

    def _triplet_scores(self) -> np.ndarray:
        """``S`` of every triplet, all matrices in model order (one device-to-host copy each)."""
        scores = np.zeros(self.init_budget, dtype=np.float64)
        for bucket in self._buckets:
            scores[bucket.score_pos] = bucket.scores().to("cpu", torch.float64).numpy()
        return scores

    def _allocate(self, budget: int, step: int, triplets: list[Triplet]) -> dict[str, list[bool]]:
        scores = self._triplet_scores()
        if np.isnan(scores).any():
            bad = [n for n, (a, b) in zip(self._names, self._bounds) if np.isnan(scores[a:b]).any()]
            raise ValueError(
                f"NaN triplet scores in {bad[:5]}: the importance state is corrupt (was a "
                "state_dict with NaN EMAs loaded?)."
            )
        # all matrices as one array: the same order, so the same tie-break, as one per matrix
        keep = allocate([scores], budget)[0]
        if self.cross_rank_check:
            check_masks_agree(keep, step=step, budget=budget)
        self._set_keep(keep)
        kept = keep.tolist()
        self._rank_pattern = {n: kept[a:b] for n, (a, b) in zip(self._names, self._bounds)}
        self._apply_masks(triplets)
        return self.rank_pattern or {}

    # -- masks --------------------------------------------------------------------------------
    def _set_keep(self, keep: np.ndarray) -> None:
        """Record the keep-mask of all matrices; hand it to the layers and the E factors."""
        self._keep = keep.copy()
        self._factors: list[list[torch.Tensor]] = []
        masked = zip(self._buckets, self._masked, self._e_dtypes, self._e_shapes)
        for bucket, ms, dtype, shapes in masked:
            if not ms:
                self._factors.append([])
                continue
            pos = np.concatenate([np.arange(*self._bounds[m]) for m in ms])
            on_device = torch.from_numpy(keep[pos]).to(bucket.device)  # one copy
            ranks = [self._ranks[m] for m in ms]
            for m, mask in zip(ms, on_device.split(ranks)):
                keep_dict(self._layers[m])[self.adapter_name] = mask
            factors = on_device.to(dtype).split(ranks)  # 0/1, shaped like E
            self._factors.append([f.view(shape) for f, shape in zip(factors, shapes)])

    def _apply_masks(self, triplets: list[Triplet]) -> None:
        for bucket, ms, factors in zip(self._buckets, self._masked, self._factors):
            bucket.apply_masks([triplets[m][1] for m in ms], factors)

    # -- following the model ------------------------------------------------------------------
    def _export_ema(self) -> dict[str, tuple[torch.Tensor, ...]] | None:
        """Per module: views (Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B) of the flat EMAs; None once final."""
        if self._finalized:
            return None
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        for bucket in self._buckets:
            assert bucket.ema_s is not None and bucket.ema_u is not None
            for k, m in enumerate(bucket.members):
                out[self._names[m]] = bucket.views(bucket.ema_s, k) + bucket.views(bucket.ema_u, k)
        return out

    def _rebuild(
        self, triplets: list[Triplet], ema: Mapping[str, tuple[torch.Tensor, ...]] | None
    ) -> None:
        """(Re)build the buckets for ``triplets`` (one per device); copy ``ema`` into them."""
        for name, (a, e, b), m in zip(self._names, triplets, range(len(triplets))):
            r = check_triplet(name, (a, e, b))
            kept = int(self._keep[self._offsets[m] : self._offsets[m + 1]].sum())
            if r != self._ranks[m] and not (self._finalized and r == kept):
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} has rank {r} where the allocator "
                    f"expects {self._ranks[m]}"
                    + (f" (or {kept} once shrunk to its pattern)" if self._finalized else "")
                    + ": shrink adapters only after the final allocation."
                )
        if self._skipped_dev is not None:  # the device counter, read once per rebuild
            self._skipped += int(self._skipped_dev.item())
            self._skipped_dev.zero_()
        by_device: dict[tuple[torch.device, bool], list[int]] = {}
        for m, (_, e, _) in enumerate(triplets):
            by_device.setdefault((e.device, is_sharded(e)), []).append(m)
        offsets, weights = self._offsets.tolist(), (1.0 - self.beta1, 1.0 - self.beta2)
        self._buckets = [
            (ShardedBucket if sharded else Bucket)(
                dev, ms, [triplets[m] for m in ms], offsets, weights, not self._finalized
            )
            for (dev, sharded), ms in by_device.items()
        ]
        for bucket in self._buckets:
            if ema is not None:
                for k, m in enumerate(bucket.members):
                    bucket.load_ema(k, ema[self._names[m]])
        # matrices physically shrunk to their final pattern have nothing left to mask
        self._masked = [
            [m for m in b.members if triplets[m][1].shape[0] == self._ranks[m]]
            for b in self._buckets
        ]
        self._e_dtypes = [triplets[ms[0]][1].dtype if ms else None for ms in self._masked]
        self._e_shapes = [[triplets[m][1].shape for m in ms] for ms in self._masked]
        self._skipped_dev = torch.zeros((), dtype=torch.int64, device=self._buckets[0].device)
        self._sharded = any(isinstance(b, ShardedBucket) for b in self._buckets)
        self._key = _key(triplets, self._sharded)
        self._set_keep(self._keep)

    def to(self, device: torch.device | str) -> RankAllocator:
        """Move the allocator state to ``device`` (the next update moves it to the adapters'
        device, where they differ)."""
        device = torch.device(device)
        for bucket in self._buckets:
            bucket.to(device)
        if self._skipped_dev is not None:
            self._skipped_dev = self._skipped_dev.to(device)
        self._key = None
        return self

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume allocation exactly, as tensors and plain Python values.

        ``ema_sensitivity`` / ``ema_uncertainty`` map ``"<module>.lora_A|lora_E|lora_B"`` to
        contiguous tensors shaped like the parameters (empty once finalized), so each can be
        written with ``safetensors``; the whole dict round-trips through ``torch.save`` and
        ``torch.load(weights_only=True)``.
        """
        ema_s: dict[str, torch.Tensor] = {}
        ema_u: dict[str, torch.Tensor] = {}
        for name, views in (self._export_ema() or {}).items():
            for k, kind in enumerate(KINDS):
                ema_s[f"{name}.{kind}"] = views[k].detach().clone()
                ema_u[f"{name}.{kind}"] = views[3 + k].detach().clone()
        return {
            "format": FORMAT,
            "adapter_name": self.adapter_name,
            "module_names": list(self._names),
            "ranks": list(self._ranks),
            "config": self._config(),
            "step": self._step,
            "budget": self._budget,
            "finalized": self._finalized,
            "skipped_steps": self.skipped_steps,
            "keep": self._keep.tolist(),
            "rank_pattern": self.rank_pattern,
            "ema_sensitivity": ema_s,
            "ema_uncertainty": ema_u,
        }

    def _config(self) -> dict[str, Any]:
        return {k: self._total_step if k == "total_step" else getattr(self, k) for k in CONFIG_KEYS}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` saved from an allocator over the same adapters.

        Raises ``ValueError``, leaving this allocator unchanged, when the state belongs to
        another format, adapter, set of modules, ranks or settings, or when an EMA tensor is
        missing, misshapen, or holds NaN, infinite or negative entries. A ``total_step`` of
        None here is taken from the state.
        """
        sd = state_dict
        total_step, keep = check_state(
            sd,
            adapter_name=self.adapter_name,
            names=self._names,
            ranks=self._ranks,
            config=self._config(),
        )
        self._validate(total_step)
        finalized = bool(sd["finalized"])
        triplets = self._read()
        ema = None if finalized else saved_ema(sd, self._names, triplets)
        pattern = sd["rank_pattern"]
        self._total_step = total_step
        self._step, self._budget = int(sd["step"]), int(sd["budget"])
        self._finalized = finalized
        self._rank_pattern = None if pattern is None else {k: list(v) for k, v in pattern.items()}
        self._keep = keep
        self._skipped_dev = None
        self._skipped = int(sd["skipped_steps"])
        self._rebuild(triplets, ema=ema)
