"""RankAllocator, the torch hook: equal to ``adalora_core.rank_allocator`` (the NumPy
specification) step by step, plus the behaviour around it (gradients, phases, settings, and
following the model when its Parameters are replaced, moved or converted).

Expected values come from ``adalora_core`` (float64) unless a test says otherwise. Checkpoints
are in ``test_allocator_checkpoint.py``, the comparison with PEFT in ``test_allocator_peft.py``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adalora_core import Triplet, rank_allocator, triplet_scores
from adalora_torch import SVDLinear
from adalora_torch._allocator import RankAllocator

Layout = Sequence[tuple[int, int, int]]  # (in_features, out_features, rank) per layer


# -- fixtures and helpers ------------------------------------------------------------------------
def build_stack(
    layout: Layout,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    adapters: Sequence[str] = ("default",),
) -> nn.ModuleDict:
    """One SVDLinear per layout entry, named ``m0, m1, ...``, E drawn non-zero."""
    torch.manual_seed(seed)
    layers = {}
    for i, (n_in, n_out, r) in enumerate(layout):
        layer = SVDLinear(
            nn.Linear(n_in, n_out), r, 8.0, adapter_name=adapters[0], init_weights=False
        )
        for name in adapters[1:]:
            layer.add_adapter(name, r, 8.0, init_weights=False)
        layers[f"m{i}"] = layer
    return nn.ModuleDict(layers).to(dtype)


@pytest.fixture
def make_stack() -> Callable[..., nn.ModuleDict]:
    """``make_stack(layout, seed=0, dtype=float64, adapters=("default",))``."""
    return build_stack


def triplets(model: nn.Module, adapter: str = "default") -> list[tuple[torch.Tensor, ...]]:
    return [
        (m.lora_A[adapter], m.lora_E[adapter], m.lora_B[adapter])
        for m in model.modules()
        if isinstance(m, SVDLinear) and adapter in m.lora_A
    ]


def as_numpy(params: list[tuple[torch.Tensor, ...]]) -> list[Triplet]:
    return [Triplet(*(t.detach().cpu().double().numpy().copy() for t in p)) for p in params]


def step_model(
    model: nn.Module, rng: np.random.Generator, adapter: str = "default", move: float = 0.1
) -> list[Triplet]:
    """Move every adapter parameter a little (the optimizer) and draw fresh gradients;
    returns the gradients as core Triplets."""
    grads = []
    with torch.no_grad():
        for p in triplets(model, adapter):
            g = []
            for t in p:
                t.add_(torch.from_numpy(rng.normal(scale=move, size=tuple(t.shape))).to(t.dtype))
                t.grad = torch.from_numpy(rng.normal(size=tuple(t.shape))).to(t.dtype)
                g.append(t.grad.double().numpy().copy())
            grads.append(Triplet(*g))
    return grads


def torch_ema(sd: dict[str, Any], names: list[str], key: str) -> list[Triplet]:
    return [
        Triplet(*(sd[key][f"{n}.{k}"].double().numpy() for k in ("lora_A", "lora_E", "lora_B")))
        for n in names
    ]


def keep_of(model: nn.Module, adapter: str = "default") -> np.ndarray:
    return np.concatenate(
        [
            m.keep[adapter].cpu().numpy()
            for m in model.modules()
            if isinstance(m, SVDLinear) and adapter in m.lora_A
        ]
    )


def assert_triplets_close(got: list[Triplet], want: list[Triplet], rtol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_allclose(a.reshape(b.shape), b, rtol=rtol, atol=1e-300)


# -- equality with the NumPy specification ------------------------------------------------------
@st.composite
def runs(draw: st.DrawFn) -> dict[str, Any]:
    total_step = draw(st.integers(3, 12))
    tfinal = draw(st.integers(0, total_step - 2))
    tinit = draw(st.integers(0, total_step - tfinal - 1))
    # small dims so equal shapes (one group, one block of the flat buffers) recur
    layout = draw(
        st.lists(
            st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
            min_size=1,
            max_size=5,
        )
    )
    beta1, beta2 = draw(st.sampled_from([(0.85, 0.85), (0.5, 0.9), (0.99, 0.1)]))
    gaps = draw(
        st.lists(st.sampled_from([1, 1, 1, 2]), min_size=total_step + 2, max_size=total_step + 2)
    )
    return dict(
        kw=dict(
            target_r=draw(st.integers(0, sum(r for *_, r in layout) // len(layout))),
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_step,
            deltaT=draw(st.integers(1, 3)),
            beta1=beta1,
            beta2=beta2,
        ),
        layout=layout,
        steps=np.cumsum([draw(st.integers(0, 1)), *gaps[:-1]]).tolist(),
        seed=draw(st.integers(0, 2**16)),
        sync_free=draw(st.booleans()),
    )


@settings(max_examples=25, deadline=None)
@given(run=runs())
def test_equals_core_allocator(run: dict[str, Any]) -> None:
    """EMAs, triplet scores, budgets, masks and phases equal the core's, step by step, for
    float64 adapters (steps may skip, so the final allocation can land past total - tfinal),
    with the host-read finiteness flag (CPU default) and the sync-free one (accelerators)."""
    kw, layout = run["kw"], run["layout"]
    rng = np.random.default_rng(run["seed"])
    model = build_stack(layout, seed=run["seed"])
    alloc = RankAllocator(model, **kw)
    alloc._sync_free = run["sync_free"]
    core = rank_allocator(**kw)
    state = core.init(as_numpy(triplets(model)))
    names = alloc.module_names
    assert names == [f"m{i}" for i in range(len(layout))]
    assert (alloc.init_budget, alloc.target_budget) == (state.budget, kw["target_r"] * len(layout))
    for step in run["steps"]:
        grads = step_model(model, rng)
        params = as_numpy(triplets(model))  # as the hook sees them
        was_final = state.finalized
        budget, pattern = alloc.update_and_allocate(step)
        state = core.update(state, step, params, grads)

        assert (budget, alloc.budget, alloc.step) == (state.budget, state.budget, step)
        assert alloc.finalized == state.finalized
        allocated = state.apply and not was_final
        assert (pattern is not None) == allocated
        want_keep = np.concatenate(state.masks)
        np.testing.assert_array_equal(keep_of(model), want_keep)
        if pattern is not None:
            assert list(pattern) == names
            np.testing.assert_array_equal(np.concatenate([pattern[n] for n in names]), want_keep)
            assert pattern == alloc.rank_pattern
        if state.apply:  # dropped triplets have E = 0
            for (_, e, _), keep in zip(triplets(model), state.masks):
                assert (e.detach()[~torch.from_numpy(keep)] == 0).all()
        sd = alloc.state_dict()
        if state.finalized:
            assert sd["ema_sensitivity"] == {} and sd["ema_uncertainty"] == {}
        else:
            assert_triplets_close(
                torch_ema(sd, names, "ema_sensitivity"), list(state.ema_sensitivity), 1e-9
            )
            assert_triplets_close(
                torch_ema(sd, names, "ema_uncertainty"), list(state.ema_uncertainty), 1e-9
            )
            want_scores = np.concatenate(
                [
                    triplet_scores(*(s * u for s, u in zip(ts, tu)))
                    for ts, tu in zip(state.ema_sensitivity, state.ema_uncertainty)
                ]
            )
            np.testing.assert_allclose(alloc._triplet_scores(), want_scores, rtol=1e-9, atol=1e-300)
    assert alloc.skipped_steps == state.skipped_steps == 0


def test_float32_adapters_track_the_core(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """float32 adapters keep float32 EMAs: equal to the float64 core within float32 rounding,
    and every allocation keeps exactly the budget."""
    kw = dict(target_r=2, tinit=2, tfinal=3, total_step=15, deltaT=2)
    layout = [(6, 5, 4), (6, 5, 4), (5, 7, 3)]
    model = make_stack(layout, dtype=torch.float32)
    alloc, core = RankAllocator(model, **kw), rank_allocator(**kw)
    state = core.init(as_numpy(triplets(model)))
    rng = np.random.default_rng(3)
    for step in range(12):
        grads = step_model(model, rng)
        params = as_numpy(triplets(model))
        budget, pattern = alloc.update_and_allocate(step)
        state = core.update(state, step, params, grads)
        assert budget == state.budget
        if pattern is not None:
            assert int(keep_of(model).sum()) == budget
        sd = alloc.state_dict()
        assert all(t.dtype == torch.float32 for t in sd["ema_sensitivity"].values())
        assert_triplets_close(
            torch_ema(sd, alloc.module_names, "ema_sensitivity"), list(state.ema_sensitivity), 1e-5
        )
        assert_triplets_close(
            torch_ema(sd, alloc.module_names, "ema_uncertainty"), list(state.ema_uncertainty), 1e-4
        )


@pytest.mark.parametrize("step_with_zero_grads", [3, 4])
def test_ties_keep_exactly_the_budget(
    make_stack: Callable[..., nn.ModuleDict], step_with_zero_grads: int
) -> None:
    """All-zero gradients give all-zero scores: exactly `budget` triplets survive (the first
    ones in model order), where PEFT's ``<= kthvalue`` rule keeps none."""
    model = make_stack([(4, 4, 3), (4, 4, 3), (4, 4, 3)])
    alloc = RankAllocator(model, target_r=1, tinit=0, total_step=8)
    for step in range(step_with_zero_grads + 1):
        for p in triplets(model):
            for t in p:
                t.grad = torch.zeros_like(t)
        budget, pattern = alloc.update_and_allocate(step)
    assert pattern is not None and 3 <= budget < 9
    keep = keep_of(model)
    assert keep.sum() == budget
    np.testing.assert_array_equal(keep, np.arange(9) < budget)


# -- non-finite gradients, missing gradients ----------------------------------------------------
@pytest.mark.parametrize("sync_free", [False, True], ids=["host_flag", "sync_free"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["lora_A", "lora_E", "lora_B"])
def test_non_finite_gradient_is_skipped(
    make_stack: Callable[..., nn.ModuleDict], bad: float, where: str, sync_free: bool
) -> None:
    """The whole update is skipped (state bit-identical, finite), counted, and allocation
    still keeps exactly the budget; on both finiteness paths."""
    kw = dict(target_r=2, tinit=0, tfinal=1, total_step=8)
    model = make_stack([(5, 4, 4), (3, 4, 4)], dtype=torch.float32)
    alloc, core = RankAllocator(model, **kw), rank_allocator(**kw)
    alloc._sync_free = sync_free
    state = core.init(as_numpy(triplets(model)))
    rng = np.random.default_rng(0)
    for step in range(6):
        grads = step_model(model, rng)
        if step == 3:
            getattr(model["m1"], where)["default"].grad.view(-1)[0] = bad
            grads[1] = Triplet(*(t.grad.numpy().copy() for t in triplets(model)[1]))
            before = alloc.state_dict()
        params = as_numpy(triplets(model))
        budget, _ = alloc.update_and_allocate(step)
        state = core.update(state, step, params, grads)
        sd = alloc.state_dict()
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert all(torch.isfinite(t).all() for t in sd[key].values())
            if step == 3:  # untouched by the bad step
                assert all(torch.equal(sd[key][k], before[key][k]) for k in sd[key])
        assert keep_of(model).sum() == budget
        assert alloc.skipped_steps == state.skipped_steps
    assert alloc.skipped_steps == state.skipped_steps == 1
    assert alloc.state_dict()["skipped_steps"] == 1


def test_missing_gradients_warn_once_and_count_as_zero(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    """A layer without gradient (frozen or unused) while others have one warns once by name
    and has I = 0, as in the core."""
    kw = dict(target_r=2, tinit=0, tfinal=0, total_step=10)
    model = make_stack([(4, 4, 3), (4, 4, 3), (4, 5, 3)])
    alloc, core = RankAllocator(model, **kw), rank_allocator(**kw)
    state = core.init(as_numpy(triplets(model)))
    rng = np.random.default_rng(1)
    for step in range(4):
        grads = step_model(model, rng)
        for t in triplets(model)[1]:
            t.grad = None
        grads[1] = Triplet(*(np.zeros_like(g) for g in grads[1]))
        params = as_numpy(triplets(model))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alloc.update_and_allocate(step)
        messages = [str(w.message) for w in caught]
        if step == 0:
            assert len(messages) == 1 and "m1" in messages[0] and "m0" not in messages[0]
        else:
            assert messages == []
        state = core.update(state, step, params, grads)
        sd = alloc.state_dict()
        assert_triplets_close(
            torch_ema(sd, alloc.module_names, "ema_sensitivity"), list(state.ema_sensitivity), 1e-9
        )
        np.testing.assert_array_equal(keep_of(model), np.concatenate(state.masks))


@pytest.mark.parametrize("step", [0, 1, 3])  # warm-up, allocation, a step after updates
def test_no_gradient_at_all_is_an_error_that_changes_nothing(
    make_stack: Callable[..., nn.ModuleDict], step: int
) -> None:
    """An importance update is due and no adapter parameter has a gradient (a call before
    backward or after zero_grad): ValueError, and the allocator and the model are as before."""
    model = make_stack([(4, 4, 3), (4, 4, 3)])
    alloc = RankAllocator(model, target_r=1, tinit=0, tfinal=2, total_step=8)
    rng = np.random.default_rng(0)
    for earlier in range(step):
        step_model(model, rng)
        alloc.update_and_allocate(earlier)
    for p in model.parameters():
        p.grad = None
    before, weights = alloc.state_dict(), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        alloc.update_and_allocate(step)
    message = str(err.value)
    assert "found no gradient on any parameter of adapter 'default'" in message
    assert "after loss.backward() and optimizer.step(), before optimizer.zero_grad()" in message
    assert message.endswith("Nothing changed.")
    after = alloc.state_dict()
    for key in ("ema_sensitivity", "ema_uncertainty"):
        assert all(torch.equal(t, before[key][k]) for k, t in after.pop(key).items())
        del before[key]
    assert after == before and alloc.step == step - 1
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())


def test_no_gradient_is_fine_once_no_update_is_due(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    """From total_step - tfinal on nothing reads gradients: none is needed."""
    model = make_stack([(4, 4, 3), (4, 4, 3)])
    alloc = RankAllocator(model, target_r=1, tinit=0, tfinal=2, total_step=6)
    for p in model.parameters():
        p.grad = None
    assert alloc.update_and_allocate(4)[1] is not None  # the final allocation
    assert alloc.finalized and alloc.update_and_allocate(5) == (2, None)


# -- the phases ---------------------------------------------------------------------------------
def test_final_phase_reapplies_masks_and_drops_state(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    model = make_stack([(4, 4, 4), (4, 6, 4)])
    alloc = RankAllocator(model, target_r=2, tinit=1, tfinal=3, total_step=10)
    rng = np.random.default_rng(0)
    patterns = []
    for step in range(8):
        step_model(model, rng)
        patterns.append(alloc.update_and_allocate(step)[1])
    assert alloc.finalized and patterns[-1] is not None  # step 7 = 10 - 3 is final
    assert patterns[-1] == alloc.rank_pattern
    assert sum(map(sum, patterns[-1].values())) == alloc.target_budget == 4
    sd = alloc.state_dict()
    assert sd["finalized"] and sd["ema_sensitivity"] == {} and sd["ema_uncertainty"] == {}
    assert all(b.ema_s is None and b.ema_u is None for b in alloc._buckets)
    keep = torch.from_numpy(keep_of(model))
    for step in range(8, 12):
        step_model(model, rng)  # the optimizer moves masked E away from 0
        before = torch.cat([e.detach().reshape(-1).clone() for _, e, _ in triplets(model)])
        assert (before[~keep] != 0).all()
        budget, pattern = alloc.update_and_allocate(step)
        after = torch.cat([e.detach().reshape(-1) for _, e, _ in triplets(model)])
        assert (budget, pattern) == (4, None)
        assert (after[~keep] == 0).all() and torch.equal(after[keep], before[keep])
    assert alloc.rank_pattern == patterns[-1]


def test_shrinking_after_the_final_allocation(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """``set_rank`` (``shrink_to_pattern``) replaces the Parameters; the hook follows."""
    model = make_stack([(4, 4, 4), (4, 6, 4)])
    alloc = RankAllocator(model, target_r=2, tinit=0, tfinal=2, total_step=5)
    rng = np.random.default_rng(0)
    for step in range(4):
        step_model(model, rng)
        alloc.update_and_allocate(step)
    pattern = alloc.rank_pattern
    assert pattern is not None
    model["m0"].set_rank("default", torch.tensor(pattern["m0"]))
    step_model(model, rng)
    e_shrunk = model["m0"].lora_E["default"].detach().clone()
    alloc.update_and_allocate(4)
    assert torch.equal(model["m0"].lora_E["default"], e_shrunk)  # nothing left to mask
    kept = sum(pattern["m0"])
    assert model["m0"].keep["default"].all() and len(model["m0"].keep["default"]) == kept
    keep1 = model["m1"].keep["default"]
    assert (model["m1"].lora_E["default"].detach()[~keep1] == 0).all()
    assert alloc.rank_pattern == pattern


def test_shrinking_before_the_final_allocation_is_an_error(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    model = make_stack([(4, 4, 4), (4, 6, 4)])
    alloc = RankAllocator(model, target_r=2, tinit=0, tfinal=2, total_step=8)
    step_model(model, np.random.default_rng(0))
    alloc.update_and_allocate(0)
    model["m0"].set_rank("default", torch.tensor([True, False, True, True]))
    step_model(model, np.random.default_rng(1))
    with pytest.raises(ValueError, match="only after the final allocation"):
        alloc.update_and_allocate(1)


# -- adapters, layers ---------------------------------------------------------------------------
def test_adapter_names_that_are_substrings_stay_apart(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    adapters = ("default", "default2", "efaul")
    kw = dict(target_r=1, tinit=0, tfinal=1, total_step=6)
    model = make_stack([(4, 4, 3), (5, 4, 3)], adapters=adapters)
    allocs = {a: RankAllocator(model, adapter_name=a, **kw) for a in adapters}
    cores = {a: rank_allocator(**kw) for a in adapters}
    states = {a: cores[a].init(as_numpy(triplets(model, a))) for a in adapters}
    rng = np.random.default_rng(5)
    for step in range(6):
        for a in adapters:
            grads = step_model(model, rng, a)
            params = as_numpy(triplets(model, a))
            others = {b: as_numpy(triplets(model, b)) for b in adapters if b != a}
            allocs[a].update_and_allocate(step)
            states[a] = cores[a].update(states[a], step, params, grads)
            np.testing.assert_array_equal(keep_of(model, a), np.concatenate(states[a].masks))
            for b, before in others.items():  # the other adapters are untouched
                assert_triplets_close(as_numpy(triplets(model, b)), before, 0.0)
            if not states[a].finalized:
                sd = allocs[a].state_dict()
                assert_triplets_close(
                    torch_ema(sd, allocs[a].module_names, "ema_sensitivity"),
                    list(states[a].ema_sensitivity),
                    1e-9,
                )


class ProtocolOnly(nn.Module):
    """The smallest layer satisfying ``SVDAdapter``: no SVDLinear code involved."""

    def __init__(self, n_in: int, n_out: int, r: int) -> None:
        super().__init__()
        self.base_layer = nn.Identity()
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(r, n_in))})
        self.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.randn(r, 1))})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(n_out, r))})
        self.ranknum = nn.ParameterDict(
            {"default": nn.Parameter(torch.tensor([float(r)]), requires_grad=False)}
        )

    def set_rank(self, adapter_name: str, keep: object) -> None:
        raise NotImplementedError


class LooksLikeLora(nn.Module):
    """Has ``lora_*`` parameter names but is no SVDAdapter: must be ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(2, 3))})


def test_layers_are_found_by_protocol_not_by_name() -> None:
    model = nn.ModuleDict(
        {"x": LooksLikeLora(), "y": ProtocolOnly(3, 2, 2), "z": ProtocolOnly(3, 2, 2)}
    )
    alloc = RankAllocator(model, target_r=1, total_step=4)
    assert alloc.module_names == ["y", "z"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert alloc.update_and_allocate(1)[1] is not None
    assert not hasattr(model["x"], "keep")
    with pytest.raises(ValueError, match="no SVD adapter layer"):
        RankAllocator(nn.ModuleDict({"x": LooksLikeLora()}), target_r=1, total_step=4)


def test_layer_shapes_are_checked_and_a_flat_e_works() -> None:
    """A third-party layer whose E is ``(r,)`` is allocated like one with ``(r, 1)``; A, E, B
    whose ranks disagree are a clear error."""
    torch.manual_seed(0)
    flat = nn.ModuleDict({"y": ProtocolOnly(3, 2, 2), "z": ProtocolOnly(3, 2, 2)})
    torch.manual_seed(0)
    column = nn.ModuleDict({"y": ProtocolOnly(3, 2, 2), "z": ProtocolOnly(3, 2, 2)})
    for layer in flat.values():
        layer.lora_E["default"] = nn.Parameter(layer.lora_E["default"].detach().reshape(-1))
    allocs = [RankAllocator(m, target_r=1, total_step=4) for m in (flat, column)]
    for step in range(3):
        for model in (flat, column):
            for p in model.parameters():
                p.grad = torch.full_like(p, float(step + 1)) * p.detach()
        assert allocs[0].update_and_allocate(step) == allocs[1].update_and_allocate(step)
    a, b = (al.state_dict()["ema_sensitivity"] for al in allocs)
    assert all(torch.equal(a[k].reshape(-1), b[k].reshape(-1)) for k in a)
    column["z"].lora_B["default"] = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"z: expected lora_A \(r, in\)"):
        allocs[1].update_and_allocate(3)


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_r=5), "lower target_r"),
        (dict(target_r=-1), "target_r must be an integer"),
        (dict(tinit=7, tfinal=3), "tinit"),
        (dict(tinit=3, tfinal=7), "tinit"),
        (dict(beta1=0.0), "beta1"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=1.5), "beta2"),
        (dict(deltaT=0), "deltaT"),
        (dict(total_step=None, tinit=-1), "tinit and tfinal must be >= 0"),
        (dict(total_step=None, target_r=5), "lower target_r"),
        (dict(adapter_name="nope"), "adapter 'nope'"),
    ],
)
def test_invalid_settings_fail_at_construction(
    make_stack: Callable[..., nn.ModuleDict], kwargs: dict[str, Any], match: str
) -> None:
    model = make_stack([(4, 4, 4), (4, 4, 4)])
    with pytest.raises(ValueError, match=match):
        RankAllocator(model, **{"target_r": 2, "total_step": 10, **kwargs})


def test_total_step_may_come_later(make_stack: Callable[..., nn.ModuleDict]) -> None:
    model = make_stack([(4, 4, 4)])
    step_model(model, np.random.default_rng(0))
    alloc = RankAllocator(model, target_r=2, tinit=3, tfinal=2)
    assert alloc.total_step is None
    with pytest.raises(ValueError, match=r"set total_step.*AdaLoraCallback"):
        alloc.update_and_allocate(0)
    with pytest.raises(ValueError, match="tinit"):
        alloc.set_total_step(5)
    alloc.set_total_step(10)
    assert alloc.total_step == 10 and alloc.update_and_allocate(0) == (4, None)


@pytest.mark.parametrize("steps", [[0, 0], [3, 2], [-1], [1, 1]])
def test_steps_must_increase(make_stack: Callable[..., nn.ModuleDict], steps: list[int]) -> None:
    model = make_stack([(4, 4, 4)])
    step_model(model, np.random.default_rng(0))
    alloc = RankAllocator(model, target_r=2, total_step=10)
    for step in steps[:-1]:
        alloc.update_and_allocate(step)
    with pytest.raises(ValueError, match="step"):
        alloc.update_and_allocate(steps[-1])


# -- following the model ------------------------------------------------------------------------
def test_removed_adapter_is_a_clear_error(make_stack: Callable[..., nn.ModuleDict]) -> None:
    model = make_stack([(4, 4, 4), (4, 4, 4)], adapters=("default", "other"))
    alloc = RankAllocator(model, target_r=2, total_step=10)
    model["m1"].delete_adapter("default")
    with pytest.raises(ValueError, match="m1: adapter 'default' was removed"):
        alloc.update_and_allocate(0)


def test_state_follows_the_adapters(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """After ``to`` (which may move the state away from the adapters; without a second device
    here it moves it to the CPU again) the next update rebuilds the buffers where the adapters
    are, carrying the EMAs over: the run continues exactly as an undisturbed one."""
    models = [make_stack([(4, 4, 4), (4, 6, 4), (4, 4, 4)]) for _ in range(2)]
    allocs = [RankAllocator(m, target_r=2, tinit=1, tfinal=2, total_step=12) for m in models]
    for step in range(12):
        old = allocs[1]._buckets[0]
        if step in (3, 10):  # budgeting, then final phase
            assert allocs[1].to("cpu") is allocs[1]
        for model, alloc in zip(models, allocs):
            step_model(model, np.random.default_rng(step))
            alloc.update_and_allocate(step)
        assert (allocs[1]._buckets[0] is not old) == (step in (3, 10))  # rebuilt then only
        a, b = (al.state_dict() for al in allocs)
        assert a["keep"] == b["keep"] and a["rank_pattern"] == b["rank_pattern"]
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_a_dtype_conversion_is_followed(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """``model.to(float64)`` mid-run (same Parameter objects, new dtype): the EMAs are carried
    over into float64 buffers and the run goes on tracking the core."""
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=12, deltaT=2)
    model = make_stack([(4, 4, 4), (4, 6, 4)], dtype=torch.float32)
    alloc, core = RankAllocator(model, **kw), rank_allocator(**kw)
    state = core.init(as_numpy(triplets(model)))
    rng = np.random.default_rng(0)
    for step in range(9):
        if step == 4:
            model.to(torch.float64)
        grads = step_model(model, rng)
        params = as_numpy(triplets(model))
        alloc.update_and_allocate(step)
        state = core.update(state, step, params, grads)
        sd = alloc.state_dict()
        assert_triplets_close(
            torch_ema(sd, alloc.module_names, "ema_sensitivity"), list(state.ema_sensitivity), 1e-5
        )
        np.testing.assert_array_equal(keep_of(model), np.concatenate(state.masks))
    assert sd["ema_sensitivity"]["m0.lora_A"].dtype == torch.float64


def test_half_precision_products_in_the_ema_dtype(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    """fp16 adapters: ``|p · g|`` is computed in fp32 (the EMA dtype), where the fp16 product
    would overflow: the step counts, with the fp32 value."""
    model = make_stack([(4, 3, 5), (4, 3, 5)], dtype=torch.float16)
    alloc = RankAllocator(model, target_r=2, total_step=100, beta1=0.5, beta2=0.5)
    a = model["m0"].lora_A["default"]
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        a.fill_(300.0)
        a.grad.fill_(300.0)  # 300 · 300 = 90000 > fp16's 65504
    alloc.update_and_allocate(0)
    assert alloc.skipped_steps == 0
    ema = alloc.state_dict()["ema_sensitivity"]["m0.lora_A"]
    assert ema.dtype == torch.float32
    assert torch.equal(ema, torch.full_like(ema, 0.5 * 90000.0))


@pytest.mark.parametrize(
    "how",
    ["parameter_dict", "only_lora_A", "load_state_dict_assign", "conversion", "raw_parameters"],
)
def test_replaced_parameters_are_noticed_between_allocations(
    make_stack: Callable[..., nn.ModuleDict], how: str
) -> None:
    """Adapter Parameters replaced by new objects (same values) at a step without allocation,
    however they are replaced (``ParameterDict`` assignment, A alone, ``load_state_dict(
    assign=True)``, a conversion writing new Parameters, a write straight into
    ``_parameters``): the allocator reads the new ones from that step on, as if nothing
    happened."""
    layout = [(4, 4, 4), (4, 6, 4)]
    models = [make_stack(layout, dtype=torch.float32) for _ in range(2)]
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=12, deltaT=4)
    allocs = [RankAllocator(m, **kw) for m in models]
    for step in range(12):
        if step == 5:  # not an allocation step (those look at every layer anyway)
            model = models[1]
            old = [t for trip in triplets(model) for t in trip]
            if how == "parameter_dict":
                for layer in model.values():
                    for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                        d["default"] = nn.Parameter(d["default"].detach().clone())
            elif how == "only_lora_A":
                for layer in model.values():
                    layer.lora_A["default"] = nn.Parameter(layer.lora_A["default"].detach().clone())
            elif how == "load_state_dict_assign":
                sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(sd, assign=True)
            elif how == "conversion":  # new Parameters written into _parameters by _apply
                torch.__future__.set_overwrite_module_params_on_conversion(True)
                try:
                    model.to(torch.float32)
                finally:
                    torch.__future__.set_overwrite_module_params_on_conversion(False)
            else:
                for layer in model.values():
                    for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                        d._parameters["default"] = nn.Parameter(d["default"].detach().clone())
                for t in old:
                    t.grad = None  # as zero_grad() leaves the old objects
            new = [t for p in triplets(model) for t in p]
            assert sum(a is not b for a, b in zip(old, new)) >= len(old) // 3
        for model in models:
            step_model(model, np.random.default_rng(step))
        results = [alloc.update_and_allocate(step) for alloc in allocs]
        assert results[0] == results[1]
        a, b = (alloc.state_dict() for alloc in allocs)
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (step, key)
    assert np.array_equal(keep_of(models[0]), keep_of(models[1]))


def test_mixed_precision_products_in_float32(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """float64 and float32 matrices in one bucket keep float32 EMAs: a float64 matrix holding
    float32 values gives the same state, bit for bit, as the all-float32 model."""
    layout = [(4, 4, 4), (4, 4, 4), (4, 4, 4), (3, 5, 2)]
    models = [make_stack(layout, dtype=torch.float32) for _ in range(2)]
    models[1]["m1"].to(torch.float64)
    models[1]["m3"].to(torch.float64)
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=12, deltaT=3)
    allocs = [RankAllocator(m, **kw) for m in models]
    for step in range(9):
        step_model(models[0], np.random.default_rng(step))
        for (_, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
            with torch.no_grad():
                b.copy_(a)
            b.grad = None if a.grad is None else a.grad.to(b.dtype)
        assert allocs[0].update_and_allocate(step) == allocs[1].update_and_allocate(step)
        a, b = (alloc.state_dict() for alloc in allocs)
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert all(b[key][k].dtype == torch.float32 for k in b[key])
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (step, key)


def test_a_layer_without_gradient_then_replaced_is_noticed(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    """m1 has no gradient at step 4 (in both runs), then at step 5 one run replaces its
    Parameters by writing into ``_parameters`` (no registration; the old ones have no
    gradient): the new Parameters are read from step 5 on, as in the undisturbed run."""
    layout = [(4, 4, 4), (4, 6, 4), (4, 4, 4)]
    models = [make_stack(layout, dtype=torch.float32) for _ in range(2)]
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=14, deltaT=4)
    allocs = [RankAllocator(m, **kw) for m in models]
    for step in range(10):
        if step == 5:
            layer = models[1]["m1"]
            for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                d._parameters["default"] = nn.Parameter(d["default"].detach().clone())
        for model in models:
            step_model(model, np.random.default_rng(step))
            if step == 4:
                for t in triplets(model)[1]:
                    t.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = [alloc.update_and_allocate(step) for alloc in allocs]
        assert results[0] == results[1]
        a, b = (alloc.state_dict() for alloc in allocs)
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (step, key)


def test_skipped_steps_counted_once_when_a_rebuild_fails(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    """A step skipped on the device (sync-free flag), then a rebuild that refuses the model
    (shrunk before the final allocation): the skipped step is still counted once."""
    model = make_stack([(4, 4, 4), (4, 6, 4)], dtype=torch.float32)
    alloc = RankAllocator(model, target_r=2, tinit=1, tfinal=2, total_step=12)
    alloc._sync_free = True
    step_model(model, np.random.default_rng(0))
    model["m0"].lora_A["default"].grad.view(-1)[0] = float("inf")
    alloc.update_and_allocate(0)
    model["m1"].set_rank("default", torch.tensor([True, True, False, False]))
    step_model(model, np.random.default_rng(1))
    for _ in range(2):
        with pytest.raises(ValueError, match="shrink adapters only after the final allocation"):
            alloc.update_and_allocate(1)
    assert alloc.skipped_steps == 1


def test_docstring_example_runs() -> None:
    """The example in ``RankAllocator``'s docstring (a doctest) runs and gives what it shows."""
    import doctest

    import adalora_torch._allocator as module

    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
