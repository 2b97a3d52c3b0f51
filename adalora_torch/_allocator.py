"""The AdaLoRA training hook: importance EMAs on the device, exact budget allocation.

Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512, eqs. (8)-(12). The
algorithm is :func:`adalora_core.rank_allocator` (the NumPy specification); this module runs it
on the adapters' device with a fixed number of kernel launches per step, however many layers.

Memory, per device: two flat buffers ``Ī`` and ``Ū``, one float per adapter entry each (the
state, checkpointed), and a workspace for ``I = |p · g|`` as large as one of them, plus a
staging buffer of at most ``2**18`` entries for gradients. On an accelerator the workspace is
allocated at the start of a call and freed at its end: the call runs after the backward pass,
when the activations are gone, and the caching allocator hands the same block to the next
forward pass, so it adds nothing to the training step's peak and the allocator holds two
floats per entry between calls. On the CPU the workspace is kept from call to call during the
budgeting phase (three floats per entry), because a fresh block of that size costs page faults
every call; it is freed with the EMAs at the final allocation. Matrices of equal shape sit next
to each other in the buffers: their ``p`` are stacked into the workspace and their ``g`` into
the staging buffer, one ``torch.stack`` each per run of equal shapes, so the number of kernel
launches per step follows the number of distinct shapes, not of layers, and their triplet
scores come from one batched reduction per shape.

Per step: one ``stack`` of ``p``, one of ``g`` and one multiply per run of equal shapes, then
six element-wise kernels over the workspace and the EMAs (abs, max, two ``lerp_`` for the
EMAs, ``|I - Ī|``). A step whose ``I`` has a non-finite entry leaves the EMAs untouched (it is
known before any EMA changes, as the spec wants). On allocation steps: ``Ī·Ū``, one mean over
A and one over B per shape group, one device-to-host copy of the ``Σ r`` scores,
``adalora_core.allocate``, one host-to-device copy of the masks and one ``_foreach_mul_``
zeroing E.

Non-finite steps: on the CPU the finiteness flag is read on the host and the step skipped. On
an accelerator it is not read (no host sync on non-allocation steps): it selects EMA weights
``(1-β1, 1-β2)`` or ``(0, 0)`` on the device, so the update becomes a no-op, and it is added to
a device counter that ``skipped_steps`` reads on demand.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from adalora_core import allocate, budget_schedule, validate_betas, validate_schedule

from ._distributed import ShardedBucket, check_masks_agree, is_sharded, unwrap_model
from ._ema import EmaState
from ._protocol import ParameterEpoch, SVDAdapter

__all__ = ["RankAllocator"]

_FORMAT = "adalora_torch.RankAllocator/1"
# Entries of a run of equal-shape parameters stacked at once: the gradients of a run are staged
# in a buffer of at most this many entries during a call (a single larger matrix needs none).
_STAGE_FLOATS = 1 << 18
# Keep the workspace (and the staging buffer) from one call to the next? None: on the CPU, where
# allocating it afresh costs page faults every call (glibc returns large blocks to the system),
# and not on accelerators, where the caching allocator hands back the same block for free.
_HOLD_WORKSPACE: bool | None = None
_KINDS = ("lora_A", "lora_E", "lora_B")
_CONFIG = ("target_r", "tinit", "tfinal", "total_step", "deltaT", "beta1", "beta2")
_STATE_KEYS = (
    "adapter_name",
    "module_names",
    "ranks",
    "config",
    "step",
    "budget",
    "finalized",
    "skipped_steps",
    "keep",
    "rank_pattern",
    "ema_sensitivity",
    "ema_uncertainty",
)


def _triplet(layer: SVDAdapter, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter]


_grad = operator.attrgetter("grad")
_device = operator.attrgetter("device")
_sensitivity = operator.methodcaller("sensitivity")
_apply_masks = operator.methodcaller("apply_masks")
_T = TypeVar("_T")
# how closely _sync_with_model looks at the layers
_QUICK, _LAYERS, _DEVICES = 0, 1, 2
# a run of the gradient gather: params (a list to stack, or one tensor), first, end, workspace
# view, staging view (None for one matrix)
_Run = tuple[Any, int, int, torch.Tensor, "torch.Tensor | None"]


def _keep_dict(layer: Any) -> dict[str, torch.Tensor]:
    keep = getattr(layer, "keep", None)
    if not isinstance(keep, dict):
        keep = {}
        layer.keep = keep
    return keep


class _Group:
    """Matrices of one bucket with equal ``(r, in, out)``; their blocks in the flat buffers are
    ``A (G, r, in) | E (G, r) | B (G, out, r)``, starting at ``offset``."""

    def __init__(self, members: list[int], r: int, n_in: int, n_out: int, offset: int) -> None:
        self.members, self.r, self.n_in, self.n_out, self.offset = members, r, n_in, n_out, offset
        self.numel = len(members) * r * (n_in + 1 + n_out)

    def scores(self, s: torch.Tensor) -> torch.Tensor:
        # S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)), as adalora_core.triplet_scores
        g, r, n_in, n_out = len(self.members), self.r, self.n_in, self.n_out
        block = s[self.offset : self.offset + self.numel]
        a = block[: g * r * n_in].view(g, r, n_in).mean(dim=2)  # (G, r)
        e = block[g * r * n_in : g * r * (n_in + 1)].view(g, r)  # (G, r)
        b = block[g * r * (n_in + 1) :].view(g, n_out, r).mean(dim=1)  # (G, r)
        return (e + (a + b)).reshape(-1)  # (G * r,), member-major


def _runs(
    params: list[torch.Tensor], limit: int
) -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    """Split ``params`` (flat-buffer order) into runs of consecutive tensors of equal shape and
    at most ``limit`` entries in all (a larger tensor is a run of its own): ``(first, end, flat
    offset, numel, shape)`` of each run, ``shape`` the stacked ``(end - first, *p.shape)``, or
    ``p.shape`` for a run of one."""
    out: list[tuple[int, int, int, int, tuple[int, ...]]] = []
    offset, k = 0, 0
    while k < len(params):
        shape, size = tuple(params[k].shape), params[k].numel()
        end = k + 1
        while (
            end < len(params)
            and tuple(params[end].shape) == shape
            and (end - k + 1) * size <= limit
        ):
            end += 1
        n = (end - k) * size
        out.append((k, end, offset, n, shape if end - k == 1 else (end - k, *shape)))
        offset, k = offset + n, end
    return out


class _Bucket(EmaState):
    """The adapted matrices that live on one device: flat EMAs and cached parameter lists.

    ``members`` are indices into the allocator's module list (model order); ``params`` lists
    A, E, B in the order of the flat buffers (group by group: all A, then all E, then all B).
    """

    def __init__(
        self,
        device: torch.device,
        members: list[int],
        triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        offsets: list[int],
        with_ema: bool,
    ) -> None:
        self.device = device
        self.members = members
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for m, (a, _, b) in zip(members, triplets):
            by_shape.setdefault((a.shape[0], a.shape[1], b.shape[0]), []).append(m)
        index = {m: k for k, m in enumerate(members)}
        self.groups: list[_Group] = []
        self.params: list[torch.Tensor] = []
        self.param_member: list[int] = []  # member of each entry of params
        offset = 0
        for (r, n_in, n_out), group_members in by_shape.items():
            self.groups.append(_Group(group_members, r, n_in, n_out, offset))
            offset += self.groups[-1].numel
            for kind in range(3):
                self.params += [triplets[index[m]][kind] for m in group_members]
                self.param_member += group_members
        self.numel = offset
        # global triplet positions of the entries of scores() (group order)
        self.score_pos = np.concatenate(
            [np.arange(offsets[m], offsets[m] + g.r) for g in self.groups for m in g.members]
            + [np.zeros(0, dtype=np.int64)]
        )
        float64 = all(p.dtype == torch.float64 for p in self.params)
        self.dtype = torch.float64 if float64 else torch.float32
        kw: dict[str, Any] = {"device": device, "dtype": self.dtype}
        self.ema_s = torch.zeros(self.numel, **kw) if with_ema else None  # Ī, flat
        self.ema_u = torch.zeros(self.numel, **kw) if with_ema else None  # Ū, flat
        # EMA weights (1-β1, 1-β2), as floats and on the device (set by the allocator)
        self.weights = (0.0, 0.0)
        self.weights_on = torch.zeros(2, **kw)
        self.none_seen: list[int] = []  # params whose gradient was None at the last update
        # runs of equal-shape params, stacked at once into the (per-call) workspace
        self.runs = _runs(self.params, _STAGE_FLOATS)
        self.stage = max((n for i, j, _, n, _ in self.runs if j - i > 1), default=0)
        # the workspace and staging buffer, when held between calls (see _HOLD_WORKSPACE)
        self.hold = device.type == "cpu" if _HOLD_WORKSPACE is None else _HOLD_WORKSPACE
        self.held: tuple[torch.Tensor, torch.Tensor, list[_Run]] | None = None
        # E parameters still at full rank, and their keep-masks as 0/1 factors of shape (r, 1)
        self.e_all = [t[1] for t in triplets]
        self.mask_members: list[int] = []
        self.mask_pos = np.zeros(0, dtype=np.int64)  # global triplet positions of mask_members
        self.e_masked: list[torch.Tensor] = []
        self.e_factors: list[torch.Tensor] = []

    def views(self, flat: torch.Tensor, member: int) -> tuple[torch.Tensor, ...]:
        """The A, E, B views of ``member`` in a flat buffer (shapes (r, in), (r, 1), (out, r))."""
        g = next(g for g in self.groups if member in g.members)
        k, n, r, n_in, n_out = g.members.index(member), len(g.members), g.r, g.n_in, g.n_out
        block = flat[g.offset : g.offset + g.numel]
        a = block[: n * r * n_in].view(n, r, n_in)[k]
        e = block[n * r * n_in : n * r * (n_in + 1)].view(n, r, 1)[k]
        b = block[n * r * (n_in + 1) :].view(n, n_out, r)[k]
        return a, e, b

    def load_ema(self, member: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """Copy ``(Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B)`` of ``member`` into the flat EMAs."""
        assert self.ema_s is not None and self.ema_u is not None
        new = self.views(self.ema_s, member) + self.views(self.ema_u, member)
        for dst, src in zip(new, tensors):
            dst.copy_(src.reshape(dst.shape))

    def _plan(self, work: torch.Tensor, stage: torch.Tensor) -> list[_Run]:
        """Per run: its parameters (a list to stack, or the one tensor), its first and end
        index, the workspace view it fills and the staging view for its gradients (None for a
        single matrix, multiplied in place)."""
        plan: list[_Run] = []
        for i, j, offset, n, shape in self.runs:
            out = work[offset : offset + n].view(shape)
            if j - i > 1:
                plan.append((self.params[i:j], i, j, out, stage[:n].view(shape)))
            else:
                plan.append((self.params[i], i, j, out, None))
        return plan

    def _gather(self, plan: list[_Run], grads: list[Any]) -> None:
        # p · g of every run into the workspace, in the EMA dtype
        for p, i, j, out, staged in plan:
            if staged is not None:  # p and g of equal-shape matrices, stacked
                torch.stack(p, out=out)
                torch.stack(grads[i:j], out=staged)
                out.mul_(staged)
            elif p.dtype == grads[i].dtype == self.dtype:
                torch.mul(p, grads[i], out=out)
            else:  # products of p and g rounded to the EMA dtype, as stacking rounds them
                g = grads[i]
                out.copy_(p).mul_(g if g.dtype == self.dtype else g.to(self.dtype))

    def sensitivity(self) -> tuple[torch.Tensor, list[int]]:
        """``I = |p · g|`` of every entry, flat (a new workspace, in the EMA dtype, unless the
        bucket holds one), and the members without a gradient (their ``I`` is 0, which is
        what a zero gradient gives)."""
        if self.held is not None:
            work, _, plan = self.held
        else:
            work = torch.empty(self.numel, device=self.device, dtype=self.dtype)
            stage = work
            if self.stage:
                stage = torch.empty(self.stage, device=self.device, dtype=self.dtype)
            plan = self._plan(work, stage)
            if self.hold:  # freed with the EMAs at the final allocation
                self.held = work, stage, plan
        grads = list(map(_grad, self.params))
        none = [i for i in self.none_seen if grads[i] is None]  # missing at the last step too
        for i in none:
            grads[i] = torch.zeros_like(self.params[i])
        with torch.no_grad():
            try:
                self._gather(plan, grads)
            except (TypeError, AttributeError):  # another gradient is None: zeros too
                more = [i for i, g in enumerate(grads) if g is None]
                if not more:
                    raise
                for i in more:
                    grads[i] = torch.zeros_like(self.params[i])
                none = sorted(none + more)
                self._gather(plan, grads)
            work.abs_()
        self.none_seen = none
        return work, sorted({self.param_member[i] for i in none})

    def scores(self) -> torch.Tensor:
        """Triplet scores of the bucket's matrices, group order (see ``score_pos``)."""
        assert self.ema_s is not None and self.ema_u is not None
        out = self.held[0] if self.held is not None else None  # the workspace, when held
        s = torch.mul(self.ema_s, self.ema_u, out=out)  # element scores Ī·Ū
        parts = [g.scores(s) for g in self.groups]
        return torch.cat(parts) if parts else s.new_zeros(0)

    def apply_masks(self) -> None:
        if self.e_masked:
            with torch.no_grad():
                torch._foreach_mul_(self.e_masked, self.e_factors)

    def to(self, device: torch.device) -> None:
        """Move the state to ``device``; a held workspace is dropped (made again there)."""
        super().to(device)
        self.held = None
        if _HOLD_WORKSPACE is None:
            self.hold = device.type == "cpu"


class RankAllocator:
    """Adaptive rank allocation for the SVD adapters of ``model`` (AdaLoRA's training hook).

    Call it once per optimizer step, after ``optimizer.step()`` and before the gradients are
    cleared::

        allocator = RankAllocator(model, target_r=8, tinit=200, tfinal=500, total_step=3000)
        for step, batch in enumerate(loader):
            loss = model(**batch).loss + orth_reg_weight * orthogonal_penalty(model)
            loss.backward()
            optimizer.step()
            allocator.update_and_allocate(step)
            optimizer.zero_grad()

    Phases, for ``final = total_step - tfinal`` (DESIGN.md, ``adalora_core.rank_allocator``):

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

    Layers are found with ``isinstance(module, SVDAdapter)`` holding ``adapter_name``; after each
    allocation every layer's ``keep[adapter_name]`` holds its boolean keep-mask (shape (r,)).
    The state lives on the adapters' device and follows them when the model moves.
    ``total_step`` may be None until ``set_total_step`` (``AdaLoraCallback`` fills it in).

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
        found = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, SVDAdapter) and adapter_name in m.lora_A
        ]
        if not found:
            others = sorted(
                {k for m in model.modules() if isinstance(m, SVDAdapter) for k in m.lora_A}
            )
            raise ValueError(
                f"The model has no SVD adapter layer with adapter {adapter_name!r} (adapters "
                f"found: {others}): inject adapters first (inject_adapters) or pass the right "
                "adapter_name."
            )
        self._names = [n for n, _ in found]
        self._layers: list[SVDAdapter] = [m for _, m in found]
        self._ranks = [int(_triplet(m, adapter_name)[1].shape[0]) for m in self._layers]
        self._offsets = np.concatenate([[0], np.cumsum(self._ranks)]).astype(np.int64)
        self._bounds = list(zip(self._offsets[:-1].tolist(), self._offsets[1:].tolist()))
        self.init_budget = int(sum(self._ranks))
        self.target_budget = self.target_r * len(self._layers)
        self._validate(_stand_in(tinit, tfinal) if total_step is None else total_step)
        self._total_step = total_step

        self._step = -1
        self._budget = self.init_budget
        self._finalized = False
        self._rank_pattern: dict[str, list[bool]] | None = None
        self._keep = np.ones(self.init_budget, dtype=bool)  # current keep-mask, all matrices
        self._skipped = 0  # skipped steps already read back from the device
        self._warned: set[str] = set()  # modules already warned about for missing gradients
        self._buckets: list[_Bucket] = []
        self._skipped_dev: torch.Tensor | None = None
        ParameterEpoch.watch()
        self._epoch = ParameterEpoch.value
        self._sharded = False  # any FSDP2 (DTensor) bucket: no retries (collectives)
        self._rebuild(ema=None)

    # -- configuration ------------------------------------------------------------------------
    def _validate(self, total_step: int) -> None:
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
        self._validate(total_step)
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
        allocation happened at this step, else None. Raises ``ValueError`` when ``total_step``
        is unset, or when ``step`` is negative or does not increase.
        """
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step must be an integer, got {step!r}.") from None
        if self._total_step is None:
            raise ValueError(
                "total_step is None: set total_step (RankAllocator(..., total_step=N) or "
                "allocator.set_total_step(N)) to the number of optimizer steps, or use "
                "AdaLoraCallback, which fills it in from the Trainer's max_steps."
            )
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step <= self._step:
            raise ValueError(
                f"step {step} does not follow the last step {self._step}: call "
                "update_and_allocate once per optimizer step with an increasing step (to "
                "resume, load_state_dict the saved allocator state instead of replaying steps)."
            )
        final = self._total_step - self.tfinal
        # 3) final phase: keep the recorded pattern
        if self._finalized:
            self._sync_with_model(_LAYERS)
            self._on_buckets(_apply_masks)
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
                total_step=self._total_step,
                deltaT=self.deltaT,
            )
        # every layer is looked at when the step allocates; other steps check a counter
        self._sync_with_model(_LAYERS if mask_now else _QUICK)
        # 1) importance, only before the final allocation
        if step < final:
            self._update_importance()
        # 2) final allocation at the first step at or past total_step - tfinal
        if step >= final:
            pattern = self._allocate(self.target_budget, step)
            for bucket in self._buckets:  # free the importance state and the workspace
                bucket.ema_s = bucket.ema_u = bucket.held = None
            self._finalized = True
            self._step, self._budget = step, self.target_budget
            return self.target_budget, pattern
        self._step, self._budget = step, budget
        return budget, (self._allocate(budget, step) if mask_now else None)

    def _update_importance(self) -> None:
        work = []
        results = self._on_buckets(_sensitivity)
        # a missing gradient may be a replaced parameter's (a write into ``_parameters``): look
        # at those layers (not under FSDP2, where a re-run on one process would hang the rest)
        if not self._sharded and self._replaced([m for _, ms in results for m in ms]):
            self._sync_with_model(_LAYERS)
            results = self._on_buckets(_sensitivity)
        for sens, missing in results:
            work.append(sens)
            new = [self._names[m] for m in missing if self._names[m] not in self._warned]
            if new:
                self._warned.update(new)
                warnings.warn(
                    f"No gradient for adapter {self.adapter_name!r} of {new} at this step "
                    "(frozen, unused, or update_and_allocate called before backward): their "
                    "sensitivity counts as 0.",
                    stacklevel=3,
                )
        # one finiteness flag for all matrices (as the core)
        flags = [
            torch.isfinite(s.amax())
            if s.numel()
            else torch.ones((), dtype=torch.bool, device=s.device)
            for s in work
        ]
        assert self._skipped_dev is not None
        dev0 = self._skipped_dev.device
        finite = flags[0] if len(flags) == 1 else torch.stack([f.to(dev0) for f in flags]).all()
        sync_free = dev0.type != "cpu" if self._sync_free is None else self._sync_free
        if not sync_free:  # reading the flag costs nothing on the CPU
            if not bool(finite):
                self._skipped += 1
                return
            for bucket, sens in zip(self._buckets, work):
                bucket.update(sens, None)
        else:  # no host sync: the flag selects the EMA coefficients on the device
            self._skipped_dev.add_(finite.to(dev0).logical_not())
            for bucket, sens in zip(self._buckets, work):
                bucket.update(sens, finite.to(bucket.device))

    def _triplet_scores(self) -> np.ndarray:
        """``S`` of every triplet, all matrices in model order (one device-to-host copy each)."""
        scores = np.zeros(self.init_budget, dtype=np.float64)
        for bucket in self._buckets:
            scores[bucket.score_pos] = bucket.scores().to("cpu", torch.float64).numpy()
        return scores

    def _allocate(self, budget: int, step: int) -> dict[str, list[bool]]:
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
        self._on_buckets(_apply_masks)
        return {n: kept[a:b] for n, (a, b) in zip(self._names, self._bounds)}

    def _set_keep(self, keep: np.ndarray) -> None:
        """Record the keep-mask of all matrices; hand it to the layers and the E factors."""
        self._keep = keep.copy()
        for bucket in self._buckets:
            if not bucket.e_masked:
                continue
            on_device = torch.from_numpy(keep[bucket.mask_pos]).to(bucket.device)  # one copy
            ranks = [self._ranks[m] for m in bucket.mask_members]
            for m, mask in zip(bucket.mask_members, on_device.split(ranks)):
                self._keep_dicts[m][self.adapter_name] = mask
            factors = on_device.to(bucket.e_masked[0].dtype).unsqueeze(1)  # (Σr, 1)
            bucket.e_factors = list(factors.split(ranks))

    # -- following the model ------------------------------------------------------------------
    def _sync_with_model(self, level: int) -> bool:
        """Rebuild the buckets when adapter parameters were replaced (``set_rank`` /
        ``shrink_to_pattern`` make new Parameters), removed, or moved to another device; True
        if so.

        Every step checks the identity and device of each bucket's first E (a conversion or
        move of the whole model). ``_QUICK`` (budgeting steps) looks at the identity of every
        A, E and B only when ``ParameterEpoch`` moved (a Parameter was registered somewhere);
        ``_LAYERS`` (allocation steps, the final phase, a replaced Parameter whose successor
        has no gradient yet) always does;
        ``_DEVICES`` (a kernel failed) also checks the device of every A, E and B.
        """
        name, epoch = self.adapter_name, ParameterEpoch.value
        if level >= _LAYERS or epoch != self._epoch:
            stale = self._replaced(range(len(self._layers)))
        else:  # a conversion (to(), overwrite_module_params_on_conversion) registers nothing
            stale = any(
                self._dicts[3 * b.members[0] + 1].get(name) is not b.e_all[0] for b in self._buckets
            )
        for bucket in self._buckets:
            tensors = bucket.params if level >= _DEVICES else bucket.e_all[:1]
            stale = stale or any(map(operator.ne, map(_device, tensors), repeat(bucket.device)))
        if stale:
            self._rebuild(ema=self._export_ema())
        self._epoch = epoch  # seen, once the buckets match the layers (a failed rebuild: not)
        return stale

    def _replaced(self, members: Iterable[int]) -> bool:
        """Whether the A, E or B of one of ``members`` is no longer the cached Parameter."""
        name = self.adapter_name
        return any(
            self._dicts[3 * m + k].get(name) is not self._cached[3 * m + k]
            for m in members
            for k in range(3)
        )

    def _on_buckets(self, fn: Callable[[Any], _T]) -> list[_T]:
        """``fn(bucket)`` for every bucket, again after a rebuild if it failed because some
        adapter parameters moved to another device (only a first E is checked each step)."""
        try:
            return [fn(bucket) for bucket in self._buckets]
        except RuntimeError:
            # sharded buckets run collectives: a retry on one process alone would hang them
            if self._sharded or not self._sync_with_model(_DEVICES):
                raise
            return [fn(bucket) for bucket in self._buckets]

    def _export_ema(self) -> dict[str, tuple[torch.Tensor, ...]] | None:
        """Per module: views (Ī_A, Ī_E, Ī_B, Ū_A, Ū_E, Ū_B) of the flat EMAs; None once final."""
        if self._finalized:
            return None
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        for bucket in self._buckets:
            assert bucket.ema_s is not None and bucket.ema_u is not None
            for m in bucket.members:
                out[self._names[m]] = bucket.views(bucket.ema_s, m) + bucket.views(bucket.ema_u, m)
        return out

    def _rebuild(self, ema: Mapping[str, tuple[torch.Tensor, ...]] | None) -> None:
        """(Re)build the device buckets from the layers; copy ``ema`` (per module) into them."""
        if self._skipped_dev is not None:  # counted here once, even if a check below raises
            self._skipped += int(self._skipped_dev.item())
            self._skipped_dev.zero_()
        by_device: dict[tuple[torch.device, bool], list[int]] = {}
        triplets = []
        for m, (name, layer) in enumerate(zip(self._names, self._layers)):
            if not all(self.adapter_name in d for d in (layer.lora_A, layer.lora_E, layer.lora_B)):
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} was removed from this layer; build a "
                    "new RankAllocator for the adapters the model has now."
                )
            a, e, b = _triplet(layer, self.adapter_name)
            r = int(e.shape[0])
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or e.numel() != r:
                raise ValueError(
                    f"{name}: expected lora_A (r, in), lora_E (r, 1) and lora_B (out, r) with "
                    f"one r, got {tuple(a.shape)}, {tuple(e.shape)} and {tuple(b.shape)}."
                )
            if not (a.device == e.device == b.device):
                raise ValueError(f"{name}: lora_A, lora_E and lora_B are on different devices.")
            kept = int(self._keep[self._offsets[m] : self._offsets[m + 1]].sum())
            if r != self._ranks[m] and not (self._finalized and r == kept):
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} has rank {r} where the allocator "
                    f"expects {self._ranks[m]}"
                    + (f" (or {kept} once shrunk to its pattern)" if self._finalized else "")
                    + ": shrink adapters only after the final allocation."
                )
            triplets.append((a, e, b))
            by_device.setdefault((e.device, is_sharded(e)), []).append(m)
        offsets = self._offsets.tolist()
        self._buckets = [  # FSDP2 (DTensor) parameters: ShardedBucket, same interface
            (ShardedBucket if sharded else _Bucket)(  # type: ignore[misc]
                dev, ms, [triplets[m] for m in ms], offsets, with_ema=not self._finalized
            )
            for (dev, sharded), ms in by_device.items()
        ]
        # for _sync_with_model: each layer's A, E, B dicts and the Parameters read from them
        # (set once the buckets exist, so a failed rebuild leaves the old ones stale)
        self._dicts = [
            d._parameters
            for layer in self._layers
            for d in (layer.lora_A, layer.lora_E, layer.lora_B)
        ]
        self._cached = [t for triplet in triplets for t in triplet]
        self._e_cached = [t[1] for t in triplets]
        self._keep_dicts = [_keep_dict(layer) for layer in self._layers]
        for bucket in self._buckets:
            # matrices physically shrunk to their final pattern have nothing left to mask
            bucket.mask_members = [
                m for m in bucket.members if self._e_cached[m].shape[0] == self._ranks[m]
            ]
            bucket.e_masked = [self._e_cached[m] for m in bucket.mask_members]
            bucket.mask_pos = np.concatenate(
                [np.arange(offsets[m], offsets[m + 1]) for m in bucket.mask_members]
                + [np.zeros(0, dtype=np.int64)]
            )
        weights = (1.0 - self.beta1, 1.0 - self.beta2)
        for bucket in self._buckets:
            bucket.weights = weights
            bucket.weights_on.copy_(torch.tensor(weights, dtype=torch.float64))
            if ema is not None and bucket.ema_s is not None and bucket.ema_u is not None:
                for m in bucket.members:
                    bucket.load_ema(m, ema[self._names[m]])
        self._skipped_dev = torch.zeros((), dtype=torch.int64, device=self._buckets[0].device)
        self._sharded = any(isinstance(b, ShardedBucket) for b in self._buckets)
        self._set_keep(self._keep)

    def to(self, device: torch.device | str) -> RankAllocator:
        """Move the allocator state to ``device`` (it also follows the adapters by itself at
        the next update when the model moves)."""
        device = torch.device(device)
        for bucket in self._buckets:
            bucket.to(device)
        if self._skipped_dev is not None:
            self._skipped_dev = self._skipped_dev.to(device)
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
            for k, kind in enumerate(_KINDS):
                ema_s[f"{name}.{kind}"] = views[k].detach().clone()
                ema_u[f"{name}.{kind}"] = views[3 + k].detach().clone()
        return {
            "format": _FORMAT,
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
        return {k: self._total_step if k == "total_step" else getattr(self, k) for k in _CONFIG}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` saved from an allocator over the same adapters.

        Raises ``ValueError``, leaving this allocator unchanged, when the state belongs to
        another format, adapter, set of modules, ranks or settings, or when an EMA tensor is
        missing, misshapen, or holds NaN, infinite or negative entries. A ``total_step`` of
        None here is taken from the state.
        """
        sd = state_dict
        if not isinstance(sd, Mapping) or sd.get("format") != _FORMAT:
            raise ValueError(f"Not a RankAllocator state dict (expected format {_FORMAT!r}).")
        missing = [k for k in _STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"The allocator state dict lacks {missing}.")
        if sd["adapter_name"] != self.adapter_name:
            raise ValueError(
                f"The state is for adapter {sd['adapter_name']!r}, this allocator tracks "
                f"{self.adapter_name!r}: build it with adapter_name={sd['adapter_name']!r}."
            )
        if list(sd["module_names"]) != self._names or list(sd["ranks"]) != self._ranks:
            saved = dict(zip(sd["module_names"], sd["ranks"]))
            ours = dict(zip(self._names, self._ranks))
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise ValueError(
                "The state was saved for other adapted modules or ranks (module, saved rank, "
                f"rank here): {[(k, saved.get(k), ours.get(k)) for k in diff[:8]]}"
                + (" (order differs)" if not diff else "")
                + "."
            )
        config, mine = dict(sd["config"]), self._config()
        if mine["total_step"] is None:
            mine["total_step"] = config.get("total_step")
        changed = {k: (config.get(k), mine[k]) for k in _CONFIG if config.get(k) != mine[k]}
        if changed:
            raise ValueError(
                f"The state was saved with other allocator settings ({{name: (saved, here)}}: "
                f"{changed}); build the allocator with the saved settings to resume."
            )
        if mine["total_step"] is not None:
            self._validate(mine["total_step"])
        keep = np.asarray(sd["keep"], dtype=bool).reshape(-1)
        if keep.shape != (self.init_budget,):
            raise ValueError(f"keep has {keep.shape[0]} entries, expected {self.init_budget}.")
        finalized = bool(sd["finalized"])
        ema: dict[str, tuple[torch.Tensor, ...]] | None = None
        if not finalized:
            ema = {}
            for name, layer in zip(self._names, self._layers):
                params = _triplet(layer, self.adapter_name)
                tensors = []
                for key in ("ema_sensitivity", "ema_uncertainty"):
                    if not isinstance(sd[key], Mapping):
                        raise ValueError(f"{key} should map names to tensors, got {sd[key]!r}.")
                    for kind, p in zip(_KINDS, params):
                        t = sd[key].get(f"{name}.{kind}")
                        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                            got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                            raise ValueError(
                                f"{key}[{name + '.' + kind!r}] should be a tensor of shape "
                                f"{tuple(p.shape)}, got {got}."
                            )
                        local = t.to_local() if hasattr(t, "to_local") else t  # DTensor
                        if not bool((torch.isfinite(local) & (local >= 0)).all()):
                            raise ValueError(
                                f"{key}[{name + '.' + kind!r}] has NaN, infinite or negative "
                                "entries, which an allocator never saves: the state is corrupt; "
                                "resume from another checkpoint."
                            )
                        tensors.append(t)
                ema[name] = tuple(tensors)
        pattern = sd["rank_pattern"]
        self._total_step = mine["total_step"]
        self._step, self._budget = int(sd["step"]), int(sd["budget"])
        self._finalized = finalized
        self._rank_pattern = None if pattern is None else {k: list(v) for k, v in pattern.items()}
        self._keep = keep
        self._skipped_dev = None
        self._skipped = int(sd["skipped_steps"])
        self._rebuild(ema=ema)


def _stand_in(tinit: object, tfinal: object) -> int:
    # a total_step that passes the checks involving it, so the others run before it is known
    if isinstance(tinit, int) and isinstance(tfinal, int):
        return max(tinit, 0) + max(tfinal, 0) + 1
    return 1
