"""Bad input from JAX gets the errors or the skipping NumPy input gets: wrong shapes and
dtypes, a rank pattern that does not match the arrays, non-finite gradients."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX tests need jax: pip install -e .[jax]")

import jax.numpy as jnp  # noqa: E402

from adalora_core import Triplet, rank_allocator  # noqa: E402

SCHEDULE = dict(target_r=1, tinit=0, tfinal=2, total_step=8, deltaT=1)
GOOD = ((3, 4), (3, 1), (5, 3))


def _jax(shapes=GOOD, dtype=jnp.float32, fill: float = 0.5) -> Triplet:
    return Triplet(*(jnp.full(s, fill, dtype=dtype) for s in shapes))


def _numpy(t: Triplet) -> Triplet:
    return Triplet(*(np.asarray(x) for x in t))


def _error(fn: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize(
    "shapes",
    [
        ((), (), ()),  # 0-d arrays
        ((3, 4), (2, 1), (5, 3)),  # E of another rank
        ((3, 4), (3, 1), (5, 2)),  # B of another rank
        ((3, 4, 1), (3, 1), (5, 3)),  # A not 2-D
    ],
    ids=["0d", "E-rank", "B-rank", "A-3d"],
)
def test_wrong_param_shapes_fail_at_init_as_from_numpy(shapes) -> None:
    alloc = rank_allocator(**SCHEDULE)
    params = _jax(shapes)
    message = _error(lambda: alloc.init([params]))
    assert message == _error(lambda: alloc.init([_numpy(params)]))
    assert "expected A (r, in)" in message and "params[0]" in message


@pytest.mark.parametrize(
    "grad_shapes",
    [
        ((4, 3), (3, 1), (3, 5)),  # transposed
        ((3, 4), (3,), (5, 3)),  # E flattened: would broadcast to (3, 3)
        ((3, 6), (3, 1), (5, 3)),  # another in_features
    ],
    ids=["transposed", "E-flat", "other-in"],
)
def test_gradients_shaped_unlike_params_fail_as_from_numpy(grad_shapes) -> None:
    alloc = rank_allocator(**SCHEDULE)
    params = _jax()
    state = alloc.init([params])
    grads = _jax(grad_shapes)
    message = _error(lambda: alloc.update(state, 0, [params], [grads]))
    assert message == _error(lambda: alloc.update(state, 0, [_numpy(params)], [_numpy(grads)]))
    assert "grads[0]" in message


def test_broadcastable_batch_axis_is_refused_not_broadcast() -> None:
    alloc = rank_allocator(**SCHEDULE)
    params = _jax()
    state = alloc.init([params])
    grads = Triplet(*(x[None] for x in _jax()))  # (1, r, in) etc.: NumPy would broadcast
    assert "grads[0]" in _error(lambda: alloc.update(state, 0, [params], [grads]))


def test_params_reshaped_after_init_fail() -> None:
    alloc = rank_allocator(**SCHEDULE)
    state = alloc.init([_jax()])
    other = _jax(((3, 6), (3, 1), (5, 3)))
    message = _error(lambda: alloc.update(state, 0, [other], [other]))
    assert "the matrix given to init" in message


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_floating_dtypes_fail_as_from_numpy(dtype) -> None:
    alloc = rank_allocator(**SCHEDULE)
    params = _jax(dtype=dtype, fill=1)
    message = _error(lambda: alloc.init([params]))
    assert message == _error(lambda: alloc.init([_numpy(params)]))
    assert re.search(r"params\[0\]\.A has dtype \w+: pass floating arrays", message)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_floats_equal_their_float32_copies(dtype) -> None:
    """bfloat16 (which NumPy does not count as floating) is widened exactly to float32; the
    allocator then runs as on the float32 copies."""
    alloc = rank_allocator(**SCHEDULE)
    key = jax.random.key(0)
    keys = jax.random.split(key, 6)
    params = Triplet(*(jax.random.normal(k, s, dtype) for k, s in zip(keys[:3], GOOD)))
    grads = Triplet(*(jax.random.normal(k, s, dtype) for k, s in zip(keys[3:], GOOD)))
    as32 = [Triplet(*(np.asarray(x).astype(np.float32) for x in t)) for t in (params, grads)]
    low, wide = alloc.init([params]), alloc.init([as32[0]])
    for step in range(3):
        low = alloc.update(low, step, [params], [grads])
        wide = alloc.update(wide, step, [as32[0]], [as32[1]])
    if dtype == jnp.bfloat16:  # the same arrays: bit-identical state
        for a, b in zip(
            low.ema_sensitivity[0] + low.ema_uncertainty[0],
            wide.ema_sensitivity[0] + wide.ema_uncertainty[0],
        ):
            np.testing.assert_array_equal(a, b)
    else:  # float16 products round in float16
        for a, b in zip(low.ema_sensitivity[0], wide.ema_sensitivity[0]):
            np.testing.assert_allclose(a, b, rtol=2e-3)
    assert low.ema_sensitivity[0].A.dtype == np.float64
    assert [m.tolist() for m in low.masks] == [m.tolist() for m in wide.masks]


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_gradient_is_skipped_as_from_numpy(bad: float, dtype) -> None:
    alloc = rank_allocator(**SCHEDULE)
    params = _jax(dtype=dtype)
    grads = _jax(dtype=dtype)
    bad_grads = grads._replace(B=grads.B.at[1, 2].set(bad))
    state = alloc.update(alloc.init([params]), 0, [params], [grads])
    from_jax = alloc.update(state, 1, [params], [bad_grads])
    from_numpy = alloc.update(state, 1, [_numpy(params)], [_numpy(bad_grads)])
    for after in (from_jax, from_numpy):
        assert after.skipped_steps == state.skipped_steps + 1
        for old, new in zip(state.ema_sensitivity[0], after.ema_sensitivity[0]):
            np.testing.assert_array_equal(old, new)
        assert np.isfinite(np.concatenate([x.ravel() for x in after.ema_uncertainty[0]])).all()


def test_rank_pattern_that_does_not_match_the_arrays_fails_as_from_numpy(tmp_path) -> None:
    pytest.importorskip("torch", reason="saving the adapter needs torch and safetensors")
    pytest.importorskip("safetensors", reason="saving the adapter needs torch and safetensors")
    import adalora_hf

    config = adalora_hf.AdaLoraConfig(target_modules=["fc"], init_r=3, target_r=1, total_step=10)
    arrays = {"fc": tuple(_jax())}
    numpy_arrays = {"fc": tuple(_numpy(_jax()))}
    for masks, expected in [
        ({"fc": [True, False]}, "has 2 entries but config.init_r is 3"),
        ({"fc2": [True, False, True]}, "names modules that have no arrays: ['fc2']"),
    ]:
        message = _error(
            lambda m=masks: adalora_hf.save_adapter_arrays(
                tmp_path / "a", arrays, config=config, masks=m
            )
        )
        assert expected in message
        assert message == _error(
            lambda m=masks: adalora_hf.save_adapter_arrays(
                tmp_path / "b", numpy_arrays, config=config, masks=m
            )
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written
