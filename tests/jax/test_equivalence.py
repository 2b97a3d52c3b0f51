"""One sequence of JAX parameters and gradients gives the same allocation through
``adalora_core.rank_allocator`` (JAX arrays) and ``adalora_torch.RankAllocator`` (the same
values as torch tensors on a model with injected adapters)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX tests need jax: pip install -e .[jax]")
torch = pytest.importorskip("torch", reason="the torch side of the comparison needs torch")

import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from adalora_core import Triplet, masks_to_rank_pattern, rank_allocator  # noqa: E402
from adalora_torch import RankAllocator, inject_adapters  # noqa: E402
from adalora_torch._layers import iter_svd_layers  # noqa: E402

SCHEDULE = dict(target_r=2, tinit=3, tfinal=4, total_step=30, deltaT=3)
LAYERS = {"q": (8, 8), "v": (8, 8), "out": (8, 6)}  # name: (in, out)
RANK = 5
GRAD_SCALE = {"q": 1.0, "v": 2.0, "out": 4.0}  # well apart, so the allocation is not a near-tie


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (n_in, n_out) in LAYERS.items():
            setattr(self, name, nn.Linear(n_in, n_out))


def _triplets(tree: dict) -> list[Triplet]:
    return [Triplet(*(tree[n][k] for k in "AEB")) for n in LAYERS]


def test_same_masks_at_every_allocation_and_same_final_pattern() -> None:
    model = Tiny()
    names = inject_adapters(model, list(LAYERS), rank=RANK, alpha=8.0)
    assert names == list(LAYERS)
    layers = dict(iter_svd_layers(model))
    torch_alloc = RankAllocator(model, **SCHEDULE)
    core = rank_allocator(**SCHEDULE)

    key = jax.random.key(0)
    params = {}
    for name, (n_in, n_out) in LAYERS.items():
        key, ka, ke, kb = jax.random.split(key, 4)
        params[name] = {
            "A": 0.02 * jax.random.normal(ka, (RANK, n_in)),
            "E": 0.02 * jax.random.normal(ke, (RANK, 1)),
            "B": 0.02 * jax.random.normal(kb, (n_out, RANK)),
        }
    state = core.init(_triplets(params))
    allocations = 0
    for step in range(SCHEDULE["total_step"]):
        grads = {}
        for name, p in params.items():
            grads[name] = {}
            for k, x in p.items():
                key, sub = jax.random.split(key)
                grads[name][k] = GRAD_SCALE[name] * jax.random.normal(sub, x.shape)
        params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)  # an SGD step
        # the torch model holds the same values, and the same gradients in .grad
        for name, layer in layers.items():
            for k, attr in zip("AEB", ("lora_A", "lora_E", "lora_B")):
                param = getattr(layer, attr)["default"]
                param.data = torch.tensor(np.asarray(params[name][k]))
                param.grad = torch.tensor(np.asarray(grads[name][k]))

        was_final = state.finalized
        budget, pattern = torch_alloc.update_and_allocate(step)
        state = core.update(state, step, _triplets(params), _triplets(grads))
        assert budget == state.budget
        if state.apply:
            params = {
                n: {**params[n], "E": params[n]["E"] * jnp.asarray(keep)[:, None]}
                for n, keep in zip(LAYERS, state.masks)
            }
        if state.apply and not was_final:  # an allocation step: both allocated
            allocations += 1
            assert pattern == masks_to_rank_pattern(list(LAYERS), state.masks)
            for name, layer in layers.items():  # and both zeroed the same E entries
                np.testing.assert_array_equal(
                    layer.lora_E["default"].detach().numpy(), np.asarray(params[name]["E"])
                )
        else:
            assert pattern is None
    assert allocations >= 3 and state.finalized and torch_alloc.finalized
    final = masks_to_rank_pattern(list(LAYERS), state.masks)
    assert torch_alloc.rank_pattern == final
    ranks = {n: sum(keep) for n, keep in final.items()}
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(LAYERS)
    assert ranks["out"] == max(ranks.values())  # the largest gradients keep the most rank
