"""RankAllocator, the torch hook: equal to ``adalora_core.rank_allocator`` (the NumPy
specification) step by step, plus the behaviour around it (warnings, errors, checkpoints).

Expected values come from ``adalora_core`` (float64) unless a test says otherwise; the PEFT
tests at the end compare with ``peft.tuners.adalora`` itself.
"""

from __future__ import annotations

import copy
import io
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


@pytest.mark.parametrize("hold", [True, False], ids=["held", "per_call"])
def test_missing_gradients_warn_once_and_count_as_zero(
    make_stack: Callable[..., nn.ModuleDict], monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    """A layer without gradient (frozen or unused) warns once by name and has I = 0; a missing
    gradient does not make the allocator look at every layer (only its own Parameters are
    checked for a replacement)."""
    monkeypatch.setattr("adalora_torch._allocator._HOLD_WORKSPACE", hold)
    kw = dict(target_r=2, tinit=0, tfinal=0, total_step=10)
    model = make_stack([(4, 4, 3), (4, 4, 3), (4, 5, 3)])
    alloc, core = RankAllocator(model, **kw), rank_allocator(**kw)
    levels: list[int] = []
    sync = alloc._sync_with_model

    def counted(level: int) -> bool:
        levels.append(level)
        return sync(level)

    monkeypatch.setattr(alloc, "_sync_with_model", counted)
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
        names = alloc.module_names
        sd = alloc.state_dict()
        assert_triplets_close(
            torch_ema(sd, names, "ema_sensitivity"), list(state.ema_sensitivity), 1e-9
        )
        np.testing.assert_array_equal(keep_of(model), np.concatenate(state.masks))
    # step 0: a quick look; steps 1-3 allocate (a full look each); m1 missing adds none
    assert levels == [0, 1, 1, 1]


def test_before_any_backward(make_stack: Callable[..., nn.ModuleDict]) -> None:
    model = make_stack([(4, 4, 3), (4, 4, 3)])
    alloc = RankAllocator(model, target_r=1, total_step=5)
    with pytest.warns(UserWarning, match=r"\['m0', 'm1'\]"):
        budget, pattern = alloc.update_and_allocate(1)
    assert pattern is not None and keep_of(model).sum() == budget
    assert all((t == 0).all() for t in alloc.state_dict()["ema_sensitivity"].values())


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


@pytest.mark.filterwarnings("ignore:No gradient")
def test_shrinking_before_the_final_allocation_is_an_error(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    model = make_stack([(4, 4, 4), (4, 6, 4)])
    alloc = RankAllocator(model, target_r=2, tinit=0, tfinal=2, total_step=8)
    alloc.update_and_allocate(0)
    model["m0"].set_rank("default", torch.tensor([True, False, True, True]))
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


# -- checkpoints --------------------------------------------------------------------------------
KW = dict(target_r=2, tinit=2, tfinal=3, total_step=14, deltaT=2)
LAYOUT = [(5, 4, 4), (5, 4, 4), (4, 6, 3)]


@pytest.mark.parametrize("stop", [1, 6, 12])  # warm-up, budgeting, final phase
def test_state_dict_resumes_exactly(make_stack: Callable[..., nn.ModuleDict], stop: int) -> None:
    model = make_stack(LAYOUT)
    alloc = RankAllocator(model, **KW)
    rng = np.random.default_rng(0)
    for step in range(stop + 1):
        step_model(model, rng)
        alloc.update_and_allocate(step)

    buffer = io.BytesIO()
    torch.save(alloc.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_stack(LAYOUT, seed=123)
    resumed_model.load_state_dict(model.state_dict())
    resumed = RankAllocator(resumed_model, **{**KW, "total_step": None})  # taken from the state
    resumed.load_state_dict(saved)
    assert (resumed.step, resumed.budget, resumed.total_step) == (alloc.step, alloc.budget, 14)
    assert resumed.rank_pattern == alloc.rank_pattern and resumed.finalized == alloc.finalized
    np.testing.assert_array_equal(keep_of(resumed_model), keep_of(model))

    seed = rng.integers(1 << 30)
    for m, a in ((model, alloc), (resumed_model, resumed)):
        run_rng = np.random.default_rng(seed)
        for step in range(stop + 1, 17):
            step_model(m, run_rng)
            a.update_and_allocate(step)
    for ta, tb in zip(
        (t for p in triplets(model) for t in p), (t for p in triplets(resumed_model) for t in p)
    ):
        assert torch.equal(ta, tb)
    sa, sb = alloc.state_dict(), resumed.state_dict()
    assert sa["rank_pattern"] == sb["rank_pattern"] and sa["keep"] == sb["keep"]


def test_state_dict_is_plain_and_safetensors_ready(
    make_stack: Callable[..., nn.ModuleDict],
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = make_stack(LAYOUT)
    alloc = RankAllocator(model, **KW)
    rng = np.random.default_rng(0)
    for step in range(5):
        step_model(model, rng)
        alloc.update_and_allocate(step)
    sd = alloc.state_dict()
    for key in ("ema_sensitivity", "ema_uncertainty"):
        blob = safetensors_torch.save(sd[key])
        back = safetensors_torch.load(blob)
        assert back.keys() == sd[key].keys()
        assert all(torch.equal(back[k], sd[key][k]) for k in back)
    assert sd["ema_sensitivity"]["m2.lora_B"].shape == (6, 3)
    plain = {k: v for k, v in sd.items() if not k.startswith("ema_")}
    assert all(not isinstance(v, torch.Tensor) for v in plain.values())


def _edit(sd: dict[str, Any], change: str) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    if change == "format":
        sd["format"] = "something else"
    elif change == "adapter":
        sd["adapter_name"] = "other"
    elif change == "config":
        sd["config"]["tinit"] = 1
    elif change == "missing_key":
        del sd["keep"]
    elif change == "ema_shape":
        sd["ema_uncertainty"]["m1.lora_A"] = torch.zeros(3, 5)
    elif change == "ema_missing":
        del sd["ema_sensitivity"]["m0.lora_E"]
    return sd


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("format", "Not a RankAllocator state"),
        ("adapter", "adapter 'other'"),
        ("config", "other allocator settings"),
        ("missing_key", "lacks"),
        ("ema_shape", r"m1\.lora_A.*shape \(4, 5\)"),
        ("ema_missing", r"m0\.lora_E"),
    ],
)
def test_load_state_dict_rejects_mismatches(
    make_stack: Callable[..., nn.ModuleDict], change: str, match: str
) -> None:
    model = make_stack(LAYOUT)
    alloc = RankAllocator(model, **KW)
    step_model(model, np.random.default_rng(0))
    alloc.update_and_allocate(0)
    sd = alloc.state_dict()
    fresh = RankAllocator(make_stack(LAYOUT), **KW)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(_edit(sd, change))
    assert fresh.state_dict()["step"] == before["step"] == -1  # unchanged


@pytest.mark.parametrize(
    "layout",
    [LAYOUT[:2], [*LAYOUT, (3, 3, 2)], [(5, 4, 4), (5, 4, 3), (4, 6, 3)]],
    ids=["fewer", "more", "other_rank"],
)
def test_load_state_dict_rejects_other_models(
    make_stack: Callable[..., nn.ModuleDict], layout: Layout
) -> None:
    sd = RankAllocator(make_stack(LAYOUT), **KW).state_dict()
    other = RankAllocator(make_stack(layout), **{**KW, "target_r": 1})
    sd["config"]["target_r"] = 1
    with pytest.raises(ValueError, match="other adapted modules or ranks"):
        other.load_state_dict(sd)


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


@pytest.mark.filterwarnings("ignore:No gradient")
def test_total_step_may_come_later(make_stack: Callable[..., nn.ModuleDict]) -> None:
    alloc = RankAllocator(make_stack([(4, 4, 4)]), target_r=2, tinit=3, tfinal=2)
    assert alloc.total_step is None
    with pytest.raises(ValueError, match=r"set total_step.*AdaLoraCallback"):
        alloc.update_and_allocate(0)
    with pytest.raises(ValueError, match="tinit"):
        alloc.set_total_step(5)
    alloc.set_total_step(10)
    assert alloc.total_step == 10 and alloc.update_and_allocate(0) == (4, None)


@pytest.mark.filterwarnings("ignore:No gradient")
@pytest.mark.parametrize("steps", [[0, 0], [3, 2], [-1], [1, 1]])
def test_steps_must_increase(make_stack: Callable[..., nn.ModuleDict], steps: list[int]) -> None:
    alloc = RankAllocator(make_stack([(4, 4, 4)]), target_r=2, total_step=10)
    for step in steps[:-1]:
        alloc.update_and_allocate(step)
    with pytest.raises(ValueError, match="step"):
        alloc.update_and_allocate(steps[-1])


# -- PEFT, the implementation this replaces -----------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


def _peft_pair(
    tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[Any, nn.Module, RankAllocator]:
    """PEFT's AdaLoRA model and ours on the same base, with the same adapter weights."""
    peft = pytest.importorskip("peft")
    from adalora_torch import inject_adapters

    torch.manual_seed(0)
    base = nn.Sequential(Block(), Block())
    ours = copy.deepcopy(base)
    config = peft.AdaLoraConfig(
        target_modules=["q", "v"], init_r=4, target_r=2, lora_alpha=8,
        tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=deltaT,
    )  # fmt: skip
    theirs = peft.get_peft_model(base, config)
    inject_adapters(ours, ["q", "v"], rank=4, alpha=8.0)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(their_params[f"base_model.model.{name}"])
                if ".lora_E." in name:  # E starts at 0 in both; make the masking visible
                    p.normal_()
                    their_params[f"base_model.model.{name}"].copy_(p)
    alloc = RankAllocator(
        ours, target_r=2, tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=deltaT
    )
    return theirs, ours, alloc


def _lora(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n.removeprefix(prefix): p for n, p in model.named_parameters() if ".lora_" in n}


def test_masks_equal_peft() -> None:
    theirs, ours, alloc = _peft_pair(tinit=1, tfinal=3, total_step=12, deltaT=2)
    their_lora, our_lora = _lora(theirs, "base_model.model."), _lora(ours)
    assert their_lora.keys() == our_lora.keys() and len(our_lora) == 12
    g = torch.Generator().manual_seed(0)
    for step in range(14):
        with torch.no_grad():
            for name, p in our_lora.items():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
                their_lora[name].copy_(p)
                p.grad = torch.randn(p.shape, generator=g)
                their_lora[name].grad = p.grad.clone()
        theirs.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        for name, p in our_lora.items():
            torch.testing.assert_close(p, their_lora[name], rtol=0, atol=0, msg=f"{name} at {step}")
    kept = [sum(v) for v in theirs.peft_config["default"].rank_pattern.values()]
    assert sum(kept) == alloc.target_budget == sum(map(sum, alloc.rank_pattern.values()))


def test_exact_budget_where_peft_over_prunes() -> None:
    """With all-zero gradients PEFT's threshold rule masks every triplet; ours keeps exactly
    the budget (DESIGN.md, deliberate improvement)."""
    theirs, ours, alloc = _peft_pair(tinit=0, tfinal=0, total_step=10, deltaT=1)
    their_lora, our_lora = _lora(theirs, "base_model.model."), _lora(ours)
    for step in range(2):
        for name, p in our_lora.items():
            p.grad = torch.zeros_like(p)
            their_lora[name].grad = torch.zeros_like(p)
        theirs.base_model.update_and_allocate(step)
        budget, _ = alloc.update_and_allocate(step)
    their_e = torch.cat([p.reshape(-1) for n, p in their_lora.items() if "lora_E" in n])
    our_e = torch.cat([p.reshape(-1) for n, p in our_lora.items() if "lora_E" in n])
    assert int((their_e != 0).sum()) == 0
    assert int((our_e != 0).sum()) == budget == 13


def test_removed_adapter_is_a_clear_error(make_stack: Callable[..., nn.ModuleDict]) -> None:
    model = make_stack([(4, 4, 4), (4, 4, 4)], adapters=("default", "other"))
    alloc = RankAllocator(model, target_r=2, total_step=10)
    model["m1"].delete_adapter("default")
    with pytest.raises(ValueError, match="m1: adapter 'default' was removed"):
        alloc.update_and_allocate(0)


def test_state_follows_the_adapters(make_stack: Callable[..., nn.ModuleDict]) -> None:
    """When the adapters are no longer where the state is (the model moved), the next update
    rebuilds the buffers where they are, carrying the EMAs over: the run continues exactly as
    an undisturbed one. Without a second device here, the move is simulated by marking the
    state as living elsewhere; ``to`` returns the allocator."""
    models = [make_stack([(4, 4, 4), (4, 6, 4), (4, 4, 4)]) for _ in range(2)]
    allocs = [RankAllocator(m, target_r=2, tinit=1, tfinal=2, total_step=12) for m in models]
    assert allocs[1].to("cpu") is allocs[1]
    for step in range(12):
        if step in (3, 10):  # budgeting, then final phase
            allocs[1]._buckets[0].device = torch.device("meta")
        for model, alloc in zip(models, allocs):
            step_model(model, np.random.default_rng(step))
            alloc.update_and_allocate(step)
        assert allocs[1]._buckets[0].device == torch.device("cpu")
        a, b = (al.state_dict() for al in allocs)
        assert a["keep"] == b["keep"] and a["rank_pattern"] == b["rank_pattern"]
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


@pytest.mark.parametrize("hold", [True, False], ids=["held", "per_call"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["host_flag", "sync_free"])
@pytest.mark.parametrize("stage", [1, 7, 40])
def test_stacking_runs_give_the_same_state_bit_for_bit(
    make_stack: Callable[..., nn.ModuleDict],
    monkeypatch: pytest.MonkeyPatch,
    stage: int,
    sync_free: bool,
    hold: bool,
) -> None:
    """However the equal-shape matrices are grouped into stacked runs (``stage`` entries at
    most; a larger matrix is multiplied on its own), and whether the workspace is held between
    calls (the CPU default) or allocated per call (the accelerator default), the EMAs, masks
    and skipped steps are the same bit for bit, a non-finite step included. Between calls a
    bucket holds its two EMAs, plus the workspace and staging buffer when it holds them."""
    layout = [(5, 4, 4), (3, 4, 4), (5, 4, 4), (6, 2, 3), (6, 2, 3), (6, 2, 3)]
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=10, deltaT=2)
    models = [make_stack(layout, dtype=torch.float32) for _ in range(2)]
    default = RankAllocator(models[0], **kw)
    monkeypatch.setattr("adalora_torch._allocator._STAGE_FLOATS", stage)
    monkeypatch.setattr("adalora_torch._allocator._HOLD_WORKSPACE", hold)
    staged = RankAllocator(models[1], **kw)
    for alloc in (default, staged):
        alloc._sync_free = sync_free
    bucket = staged._buckets[0]
    runs = bucket.runs
    assert [r[0] for r in runs] == [0, *[r[1] for r in runs[:-1]]]  # consecutive, in order
    assert runs[-1][1] == len(bucket.params) and sum(r[3] for r in runs) == bucket.numel
    for first, end, _, n, shape in runs:
        assert len({tuple(p.shape) for p in bucket.params[first:end]}) == 1
        assert end - first == 1 or n <= stage
        assert int(np.prod(shape)) == n
    assert len(runs) > len(default._buckets[0].runs)
    for step in range(10):
        for model in models:
            step_model(model, np.random.default_rng(step))
            if step == 4:  # a non-finite gradient in the last matrix: the step is skipped
                model["m5"].lora_B["default"].grad.view(-1)[-1] = float("nan")
        results = [alloc.update_and_allocate(step) for alloc in (default, staged)]
        assert results[0] == results[1]
        a, b = (alloc.state_dict() for alloc in (default, staged))
        assert a["keep"] == b["keep"] and a["skipped_steps"] == b["skipped_steps"]
        for key in ("ema_sensitivity", "ema_uncertainty"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        if not staged.finalized:  # held between calls: Ī, Ū, small bookkeeping (+ workspace)
            held = [
                t
                for t in vars(bucket).values()
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
            ]
            held += list(bucket.held[:2] if bucket.held else ())
            assert (bucket.held is not None) == hold
            extra = bucket.numel + bucket.stage if hold else 0
            distinct = {t.untyped_storage().data_ptr(): t.numel() for t in held}
            assert sum(distinct.values()) <= 2 * bucket.numel + 2 + extra
    assert staged.skipped_steps == 1
    assert bucket.held is None  # freed with the EMAs at the final allocation


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


def test_a_kernel_failing_after_a_partial_move_rebuilds_then_retries(
    make_stack: Callable[..., nn.ModuleDict],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step checks the device of one E per bucket; when a kernel fails because other
    parameters moved (here: one A reports another device), every parameter is checked, the
    buckets are rebuilt and the step runs again, with the same result as an undisturbed run.
    A failure with nothing moved is raised as it is."""
    from types import SimpleNamespace

    from adalora_torch._allocator import _Bucket

    models = [make_stack([(4, 4, 4), (4, 6, 4)], dtype=torch.float32) for _ in range(2)]
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=10)
    allocs = [RankAllocator(m, **kw) for m in models]
    real = _Bucket.sensitivity
    fail: dict[str, Any] = {"left": 0, "bucket": None}

    def flaky(self: _Bucket) -> Any:
        if fail["left"] and self is fail["bucket"]:
            fail["left"] -= 1
            raise RuntimeError("Expected all tensors to be on the same device")
        return real(self)

    monkeypatch.setattr(_Bucket, "sensitivity", flaky)
    for step in range(10):
        for model in models:
            step_model(model, np.random.default_rng(step))
        if step == 3:  # the disturbed allocator: a moved parameter only a full check sees
            bucket = allocs[1]._buckets[0]
            fail.update(left=1, bucket=bucket)
            bucket.params = [*bucket.params, SimpleNamespace(device=torch.device("meta"))]
        results = [alloc.update_and_allocate(step) for alloc in allocs]
        assert results[0] == results[1]
        if step == 3:
            assert allocs[1]._buckets[0] is not bucket  # rebuilt from the layers
    a, b = (alloc.state_dict() for alloc in allocs)
    assert a["keep"] == b["keep"] and a["rank_pattern"] == b["rank_pattern"]

    fresh = RankAllocator(make_stack([(4, 4, 4)], dtype=torch.float32), **kw)
    fail.update(left=1, bucket=fresh._buckets[0])
    with pytest.raises(RuntimeError, match="same device"):
        fresh.update_and_allocate(0)


@pytest.mark.parametrize(
    "how",
    ["parameter_dict", "only_lora_A", "load_state_dict_assign", "conversion", "raw_parameters"],
)
def test_replaced_parameters_are_noticed_between_allocations(
    make_stack: Callable[..., nn.ModuleDict], how: str
) -> None:
    """Adapter Parameters replaced by new objects (same values) at a step without allocation:
    the allocator reads the new ones from that step on, as if nothing happened. Registrations
    (``ParameterDict`` assignment, ``load_state_dict(assign=True)``) move ``ParameterEpoch``
    (seen even though the old Parameters keep a gradient), for A alone too; a conversion of
    the whole model that writes new Parameters into ``_parameters`` is seen through the first
    E; another write straight into ``_parameters`` is seen through the old Parameter's missing
    gradient (what ``zero_grad()`` leaves, torch's default ``set_to_none=True``)."""
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


def test_parameter_epoch_moves_on_registration_and_deletion() -> None:
    """The counter behind the allocator's cheap per-step check."""
    from adalora_torch._protocol import ParameterEpoch

    ParameterEpoch.watch()
    layer = SVDLinear(nn.Linear(3, 3), 2, 4.0)
    before = ParameterEpoch.value
    layer.lora_E["default"] = nn.Parameter(torch.zeros(2, 1))
    assert ParameterEpoch.value > before
    before = ParameterEpoch.value
    layer.delete_adapter("default")
    assert ParameterEpoch.value > before


def test_mixed_precision_bucket_does_not_depend_on_grouping(
    make_stack: Callable[..., nn.ModuleDict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """float64 and float32 matrices in one bucket (float32 EMAs): a matrix multiplied alone
    rounds its gradient to float32 as a stacked one does, so the grouping changes nothing."""
    layout = [(4, 4, 4), (4, 4, 4), (4, 4, 4), (3, 5, 2)]
    models = [make_stack(layout, dtype=torch.float32) for _ in range(2)]
    for model in models:
        model["m1"].to(torch.float64)
        model["m3"].to(torch.float64)
    kw = dict(target_r=2, tinit=1, tfinal=2, total_step=12, deltaT=3)
    default = RankAllocator(models[0], **kw)
    monkeypatch.setattr("adalora_torch._allocator._STAGE_FLOATS", 1)  # every matrix alone
    alone = RankAllocator(models[1], **kw)
    assert len(alone._buckets[0].runs) > len(default._buckets[0].runs)
    for step in range(9):
        for model in models:
            step_model(model, np.random.default_rng(step))
        assert default.update_and_allocate(step) == alone.update_and_allocate(step)
        a, b = default.state_dict(), alone.state_dict()
        for key in ("ema_sensitivity", "ema_uncertainty"):
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
