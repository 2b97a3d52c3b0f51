"""Adapters on bitsandbytes' quantized layers, and the refusal of other quantized layer types.

bitsandbytes 0.50 runs ``Linear8bitLt`` and ``Linear4bit`` on the CPU; the tests that need it
skip when it is absent (``adalora[bnb]`` installs it). Layers are built directly and quantized
by ``.to("cpu")``, as bitsandbytes does on the first move to a device.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest
import torch
from torch import nn

from adalora_torch import (
    SVDLinear,
    SVDLinear4bit,
    SVDLinear8bitLt,
    inject_adapters,
    shrink_to_pattern,
    to_lora_state_dict,
)
from adalora_torch._bnb import dequantize_weight

IN, OUT, RANK = 64, 32, 4


@pytest.fixture
def bnb() -> ModuleType:
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def _quantized(bnb: ModuleType, kind: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "8bit":
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=compute_dtype, quant_type="nf4")
    return layer.to("cpu")  # quantizes


def _net(bnb: ModuleType, kind: str) -> nn.Sequential:
    return nn.Sequential(_quantized(bnb, kind), nn.Tanh(), nn.Linear(OUT, 3))


def _randomize(model: nn.Module) -> None:
    # a trained-size update: entries of ΔW up to a few hundredths, several grid steps
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "lora_E" in name else 0.1))


@pytest.mark.parametrize("kind,cls", [("8bit", SVDLinear8bitLt), ("4bit", SVDLinear4bit)])
def test_injection_picks_the_bnb_layer_with_the_layers_sizes(bnb, kind, cls) -> None:
    model = _net(bnb, kind)
    assert inject_adapters(model, ["0"], rank=RANK) == ["0"]
    layer = model[0]
    assert type(layer) is cls and isinstance(layer, SVDLinear)
    # 4-bit: the packed weight is (IN*OUT/2, 1); the adapter follows in/out_features
    assert layer.lora_A["default"].shape == (RANK, IN)
    assert layer.lora_B["default"].shape == (OUT, RANK)
    assert layer.lora_E["default"].shape == (RANK, 1)
    assert all(p.dtype == torch.float32 for p in (layer.lora_A["default"], layer.lora_B["default"]))


def test_the_adapter_runs_in_float32_and_returns_the_base_dtype(bnb) -> None:
    base = _quantized(bnb, "4bit", compute_dtype=torch.float16)
    x = torch.randn(5, IN, dtype=torch.float16)
    expected_base = base(x)
    layer = SVDLinear4bit(base, RANK, 8.0, init_weights=False)
    out = layer(x)
    assert out.dtype == torch.float16 == expected_base.dtype
    a, e, b = (d["default"] for d in (layer.lora_A, layer.lora_E, layer.lora_B))
    update = x.float() @ (a * e).T @ b.T * 8.0 / (RANK + 1e-5)
    torch.testing.assert_close(out, (expected_base.float() + update).half())
    out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_shrink_and_lora_export_work_on_quantized_layers(bnb, kind) -> None:
    model = _net(bnb, kind)
    inject_adapters(model, ["0"], rank=RANK, init_weights=False)
    layer = model[0]
    x = torch.randn(6, IN)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        layer.lora_E["default"][~keep] = 0.0
        before = model(x)
    assert shrink_to_pattern(model, rank_pattern={"0": keep.tolist()}) == {"0": 2}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    tensors, ranks = to_lora_state_dict(model)
    assert ranks == {"0": 2}
    delta = tensors["0.lora_B.weight"] @ tensors["0.lora_A.weight"]
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach())


def _half_step(bnb: ModuleType, kind: str, weight: torch.Tensor) -> torch.Tensor:
    """Half the spacing of the quantization grid around each entry of ``weight`` (out, in):
    int8 rows: absmax/127; NF4 blocks of 64: absmax times the widest gap of the NF4 code."""
    if kind == "8bit":
        return weight.abs().amax(dim=1, keepdim=True).expand_as(weight) / 127 / 2
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    widest = (code.sort().values.diff()).max()
    blocks = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    return (blocks * widest / 2).expand(-1, 64).reshape(weight.shape)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_merge_requantizes_within_half_a_grid_step(bnb, kind) -> None:
    model = _net(bnb, kind)
    inject_adapters(model, ["0"], rank=RANK, init_weights=False)
    _randomize(model)
    layer = model[0]
    dtype = layer.weight.dtype
    original = dequantize_weight(layer.base_layer)
    delta = layer.get_delta_weight("default").detach()
    assert delta.abs().max() > 0.01  # a real update, several grid steps for some entries

    layer.merge(safe_merge=True)
    merged = dequantize_weight(layer.base_layer)
    assert layer.weight.dtype == dtype  # still integer storage
    target = original + delta
    slack = 1e-3 * target.abs().amax() if kind == "8bit" else 1e-6  # 8-bit goes through fp16
    assert ((merged - target).abs() <= _half_step(bnb, kind, merged) + slack).all()

    layer.unmerge()
    restored = dequantize_weight(layer.base_layer)
    assert not layer.merged and layer.weight.dtype == dtype
    # two roundings: merge and unmerge
    bound = 2 * (_half_step(bnb, kind, merged) + _half_step(bnb, kind, restored) + slack)
    assert ((restored - original).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_merging_a_zero_update_leaves_the_quantized_weight_as_it_was(bnb, kind) -> None:
    # the generic SVDLinear once added float updates into int8 storage: 61% of the entries of
    # a q_proj changed; requantizing an unchanged weight must give it back
    model = _net(bnb, kind)
    inject_adapters(model, ["0"], rank=RANK)  # E = 0: ΔW = 0
    layer = model[0]
    storage, values = layer.weight.detach().clone(), dequantize_weight(layer.base_layer)
    # int8 and the 4-bit codes come back exactly; with double quantization (the default of
    # Linear4bit) the 8-bit-quantized block scales are quantized again: relative 2**-7 at most
    tol = {"rtol": 0, "atol": 0} if kind == "8bit" else {"rtol": 2**-7, "atol": 0}
    layer.merge()
    torch.testing.assert_close(dequantize_weight(layer.base_layer), values, **tol)
    if kind == "8bit":
        assert torch.equal(layer.weight, storage)
    layer.unmerge()
    torch.testing.assert_close(dequantize_weight(layer.base_layer), values, **tol)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base(bnb, kind) -> None:
    model = _net(bnb, kind)
    inject_adapters(model, ["0"], rank=RANK)
    layer = model[0]
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_E["default"].fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, before) and not layer.merged


def test_an_8bit_merge_refuses_float16_overflow(bnb) -> None:
    model = _net(bnb, "8bit")
    inject_adapters(model, ["0"], rank=RANK)
    layer = model[0]
    with torch.no_grad():
        layer.lora_E["default"].fill_(1e9)  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="float16"):
        layer.merge(safe_merge=True)


def _fake_class(name: str, module: str, base: type = nn.Module) -> type:
    def init(self: nn.Module) -> None:
        base.__init__(self, IN, OUT) if base is nn.Linear else base.__init__(self)

    return type(name, (base,), {"__module__": module, "__init__": init})


class _SubclassTensor(torch.Tensor):
    pass


_SubclassTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"


def _int8_linear() -> nn.Module:
    layer = nn.Linear(IN, OUT)
    layer.weight = nn.Parameter(torch.zeros(OUT, IN, dtype=torch.int8), requires_grad=False)
    return layer


def _torchao_like_linear() -> nn.Module:
    layer = nn.Linear(IN, OUT)
    layer.weight = nn.Parameter(
        torch.Tensor._make_subclass(_SubclassTensor, torch.zeros(OUT, IN)), requires_grad=False
    )
    return layer


@pytest.mark.parametrize(
    "make,named",
    [
        (lambda: _fake_class("QuantLinear", "auto_gptq.nn_modules.qlinear")(), "QuantLinear"),
        (lambda: _fake_class("WQLinear_GEMM", "awq.modules.linear.gemm")(), "WQLinear_GEMM"),
        (lambda: _fake_class("HQQLinear", "hqq.core.quantize")(), "HQQLinear"),
        (lambda: _fake_class("QLinear", "optimum.quanto.nn", nn.Linear)(), "QLinear"),
        (_int8_linear, "torch.int8"),
        (_torchao_like_linear, "torchao.dtypes"),
    ],
)
def test_other_quantized_layers_are_refused_by_name_and_type(make, named) -> None:
    model = nn.Sequential(make(), nn.Linear(OUT, 2))
    with pytest.raises(ValueError, match="Module '0' matches") as info:
        inject_adapters(model, ["0"], rank=RANK)
    assert named in str(info.value) and "bitsandbytes" in str(info.value)
    assert not any(isinstance(m, SVDLinear) for m in model.modules())  # nothing changed


def test_adalora_torch_does_not_import_bitsandbytes() -> None:
    code = "import sys, adalora_torch; assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantizing_a_4bit_weight_packed_by_cpu_inference_keeps_its_values(
    bnb, double_quant
) -> None:
    # bitsandbytes' CPU kernels repack a 4-bit weight on the first eval forward (where the CPU
    # has AVX512-BF16), absmax in bfloat16; a merge must read the same weight back
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(  # 2 blocks per row
        2 * IN, OUT, compute_dtype=torch.float32, compress_statistics=double_quant
    )
    with torch.no_grad():  # blocks of very different scales, so a mixed-up order shows
        base.weight.data *= torch.linspace(0.05, 2.0, 2 * IN)
    base = base.to("cpu")
    layer = SVDLinear4bit(base, RANK, 8.0, init_weights=False)
    before = dequantize_weight(base)
    x = torch.randn(3, 2 * IN)
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
        after = dequantize_weight(base)
        torch.testing.assert_close(after, before, rtol=2**-6, atol=0)  # bfloat16 scales
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0.05)
