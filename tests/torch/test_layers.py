"""SVD adapter layers: forward formula, merge, dtypes, dropout, adapters side by side.

Expected values come from the forward formula of docs/design.md ("Forward and initialisation"):
``y = base(x) + x @ (A ⊙ E)ᵀ @ Bᵀ · scaling / (r₀ + 1e-5)``, computed here independently.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adalora_torch import SVDAdapter, SVDConv2d, SVDEmbedding, SVDLinear, orthogonal_penalty

LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")


def expected_output(layer: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Base output plus the formula's update for each adapter in ``names``."""
    out = layer.base_layer(x)
    for n in names:
        a, e, b = layer.lora_A[n], layer.lora_E[n], layer.lora_B[n]
        s = layer.scaling[n] / (layer.ranknum[n] + 1e-5)
        if isinstance(layer, SVDConv2d):
            base = layer.base_layer
            kernel = (b @ (a * e)).reshape(base.weight.shape) * s
            out = out + F.conv2d(x, kernel, stride=base.stride, padding=base.padding)
        elif isinstance(layer, SVDEmbedding):
            out = out + F.one_hot(x, a.shape[1]).float() @ (a * e).T @ b.T * s
        else:
            out = out + x @ (a * e).T @ b.T * s
    return out


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_equals_formula(make_layer, kind):
    layer, x = make_layer(kind)
    assert isinstance(layer, SVDAdapter)
    y = layer(x)
    torch.testing.assert_close(y, expected_output(layer, x, ["default"]))
    assert not torch.allclose(y, layer.base_layer(x))  # the adapter does something


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_shapes_and_init(make_layer, kind):
    layer, x = make_layer(kind, e_std=None, rank=3, alpha=0.0, init_weights=True)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    n_in = {"linear": 6, "conv1d": 6, "conv2d": 3 * 3 * 3, "embedding": 10}[kind]
    n_out = {"linear": 5, "conv1d": 5, "conv2d": 4, "embedding": 5}[kind]
    assert (a.shape, e.shape, b.shape) == ((3, n_in), (3, 1), (n_out, 3))
    assert torch.all(e == 0) and a.std() > 0 and b.std() > 0
    assert layer.ranknum["default"].item() == 3.0 and not layer.ranknum["default"].requires_grad
    assert layer.scaling["default"] == 3.0  # alpha <= 0 -> r₀
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # E = 0: starts as the base


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_unmerge_restores_weight_and_outputs(make_layer, kind):
    layer, x = make_layer(kind)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x).detach()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert not torch.equal(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_conv1d_delta_is_transposed(make_layer):
    layer, _ = make_layer("conv1d")
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (6, 5)
    assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape == (6, 5)


def test_fan_in_fan_out_is_corrected_with_a_warning(make_base):
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        layer = SVDLinear(nn.Linear(4, 3), 2, 1.0, fan_in_fan_out=True)
    assert not layer.fan_in_fan_out
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        layer = SVDLinear(make_base("conv1d"), 2, 1.0)
    assert layer.fan_in_fan_out


def test_safe_merge_refuses_nan_and_leaves_weight(make_layer):
    layer, _ = make_layer("linear")
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_E["default"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_merge_unknown_adapter_raises(make_layer):
    layer, _ = make_layer("linear")
    with pytest.raises(ValueError, match="Unknown adapters"):
        layer.merge(adapter_names=["nope"])


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_fp32_adapters(make_layer, kind, dtype):
    layer, x = make_layer(kind)
    ref = expected_output(layer, x, ["default"]).detach()
    layer.base_layer.to(dtype)
    x_low = x.to(dtype) if x.is_floating_point() else x
    y = layer(x_low)
    assert y.dtype == dtype
    assert layer.lora_A["default"].dtype == torch.float32
    tol = 5e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


def test_disable_adapters_gives_base_and_unmerges(make_layer):
    layer, x = make_layer("linear")
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.disable_adapters = True
    y = layer(x)
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(y, layer.base_layer(x))
    layer.disable_adapters = False
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_dropout_active_in_train_only(make_layer):
    layer, x = make_layer("linear", dropout=0.5)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    layer.train()
    torch.manual_seed(3)
    y1 = layer(x)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    torch.testing.assert_close(layer(x), expected_output(layer, x, ["default"]))
    torch.testing.assert_close(layer(x), layer(x))


NAMES = ["default", "default2", "efaul"]


@pytest.fixture
def three_adapter_layer(make_layer):
    layer, x = make_layer("linear")
    for i, n in enumerate(NAMES[1:]):
        torch.manual_seed(10 + i)
        layer.add_adapter(n, rank=2 + i, alpha=4.0, init_weights=False)
    return layer, x


def test_substring_adapter_names_stay_apart(three_adapter_layer):
    layer, x = three_adapter_layer
    assert layer.active_adapters == NAMES
    assert [layer.r[n] for n in NAMES] == [4, 2, 3]
    params = dict(layer.named_parameters())
    assert {f"lora_A.{n}" for n in NAMES} <= params.keys()
    assert len({id(layer.lora_A[n]) for n in NAMES}) == 3
    torch.testing.assert_close(layer(x), expected_output(layer, x, NAMES))
    penalties = [orthogonal_penalty(layer, adapter_name=n).item() for n in NAMES]
    assert len(set(penalties)) == 3
    layer.set_adapter("default2")
    torch.testing.assert_close(layer(x), expected_output(layer, x, ["default2"]))
    layer.delete_adapter("default")
    assert "default" not in layer.lora_A and "default2" in layer.lora_A
    assert "lora_A.default" not in dict(layer.named_parameters())


def test_add_existing_or_set_unknown_adapter_raises(make_layer):
    layer, _ = make_layer("linear")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2, 1.0)
    with pytest.raises(ValueError, match="Unknown adapters"):
        layer.set_adapter(["default", "defaul"])


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_set_rank_slices_triplets_and_keeps_output(make_layer, kind):
    layer, x = make_layer(kind)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        layer.lora_E["default"][~keep] = 0.0  # what the allocator does
    y = layer(x).detach()
    a_old = layer.lora_A["default"].detach().clone()
    layer.set_rank("default", keep)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert a.shape[0] == e.shape[0] == b.shape[1] == 2 == layer.r["default"]
    assert a.requires_grad and e.requires_grad and b.requires_grad
    assert torch.equal(a, a_old[keep])
    assert layer.ranknum["default"].item() == 4.0
    assert torch.equal(layer.keep["default"], torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        layer.set_rank("default", torch.tensor([True]))


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=1"):
        SVDConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1.0)


def test_wrong_base_type_is_refused():
    with pytest.raises(ValueError, match=r"nn\.Linear or transformers' Conv1D"):
        SVDLinear(nn.Conv2d(2, 2, 1), 2, 1.0)


def test_gradients_reach_adapters(make_layer):
    layer, x = make_layer("linear")
    layer(x).sum().backward()
    assert all(p.grad is not None for p in (layer.lora_A["default"], layer.lora_E["default"]))


def test_deepcopy_keeps_state(make_layer):
    layer, x = make_layer("conv2d")
    clone = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(clone(x), layer(x))
