"""LoftQ initialisation (``adalora_torch._loftq``): the quantized base plus the SVD triplets fit
the full-precision weight better than the quantized weight alone, with bitsandbytes' own
quantization (it runs on the CPU; the tests skip when it is absent)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

from adalora_torch import SVDLinear4bit, SVDLinear8bitLt, inject_adapters
from adalora_torch._bnb import dequantize_weight
from adalora_torch._loftq import loftq_init, quantize_linear

IN, OUT, RANK = 64, 192, 8
ALPHA = 16.0  # scale 2: E = singular values / 2, so a missing division shows


@pytest.fixture
def bnb() -> ModuleType:
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def _weight(seed: int = 0) -> torch.Tensor:
    # a pretrained-like weight: a few strong directions on top of noise
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(OUT, 6, generator=g) @ torch.randn(6, IN, generator=g)
    return 0.05 * torch.randn(OUT, IN, generator=g) + 0.02 * low


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.normal_(0, 0.1)
    return layer


def _effective(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight the adapter layer computes with."""
    assert isinstance(layer, (SVDLinear4bit, SVDLinear8bitLt))
    return dequantize_weight(layer.base_layer) + layer.get_delta_weight("default").detach()


def _plain_error(weight: torch.Tensor, bits: int) -> float:
    return float((weight - dequantize_weight(quantize_linear(_linear(weight), bits))).norm())


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_start_fits_the_weight_better_than_plain_quantization(bnb, bits) -> None:
    w = _weight()
    model = nn.Sequential(_linear(w))
    inject_adapters(model, ["0"], rank=RANK, alpha=ALPHA, loftq_bits=bits, loftq_iter=1)
    layer = model[0]
    assert type(layer) is (SVDLinear4bit if bits == 4 else SVDLinear8bitLt)
    loftq_error = float((w - _effective(layer)).norm())
    plain = _plain_error(w, bits)
    # rank 8 of a 64-column residual: a clear, not marginal, reduction
    assert loftq_error < 0.9 * plain, (loftq_error, plain)


@pytest.mark.parametrize("bits", [4, 8])
def test_more_iterations_do_not_make_the_fit_worse(bnb, bits) -> None:
    w = _weight(1)
    errors = []
    for iterations in (1, 2, 4):
        init = loftq_init(w, RANK, bits, iterations)
        fitted = init.dequantized + init.lora_B @ (init.lora_E * init.lora_A)
        errors.append(float((w - fitted).norm()))
    assert errors[1] <= errors[0] * (1 + 1e-4) and errors[2] <= errors[1] * (1 + 1e-4), errors
    assert errors[2] < errors[0]  # and the alternation does something


def test_triplets_are_the_scaled_top_singular_triplets_of_the_residual(bnb) -> None:
    w = _weight(2)
    model = nn.Sequential(_linear(w))
    inject_adapters(model, ["0"], rank=RANK, alpha=ALPHA, loftq_bits=4, loftq_iter=3)
    layer = model[0]
    a, e, b = (d["default"].detach() for d in (layer.lora_A, layer.lora_E, layer.lora_B))
    assert a.shape == (RANK, IN) and e.shape == (RANK, 1) and b.shape == (OUT, RANK)
    assert all(p["default"].requires_grad for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    # the residual of the quantized weight the base holds (Q_T), and its singular values
    residual = w - dequantize_weight(layer.base_layer)
    s = torch.linalg.svdvals(residual)[:RANK]
    scale = ALPHA / (RANK + 1e-5)
    torch.testing.assert_close(e[:, 0] * scale, s, rtol=1e-4, atol=1e-6)
    assert bool((e > 0).all())  # the allocator starts from nonzero singular values
    torch.testing.assert_close(a @ a.T, torch.eye(RANK), atol=1e-4, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(RANK), atol=1e-4, rtol=0)
    # scale · B diag(E) A is the best rank-RANK approximation of that residual
    u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
    best = u[:, :RANK] @ (sv[:RANK, None] * vh[:RANK])
    torch.testing.assert_close(layer.get_delta_weight("default"), best, rtol=1e-4, atol=1e-5)


def test_the_base_holds_the_requantized_weight_that_pairs_with_the_triplets(bnb) -> None:
    # with 2+ iterations Q_T = quant(W - L_{T-1}) is not the plain quantization of W
    w = _weight(3)
    model = nn.Sequential(_linear(w))
    inject_adapters(model, ["0"], rank=RANK, alpha=ALPHA, loftq_bits=4, loftq_iter=2)
    held = dequantize_weight(model[0].base_layer)
    plain = dequantize_weight(quantize_linear(_linear(w), 4))
    assert not torch.equal(held, plain)
    expected = loftq_init(w, RANK, 4, 2, scale=ALPHA / (RANK + 1e-5))
    torch.testing.assert_close(held, expected.dequantized, rtol=0, atol=0)
    torch.testing.assert_close(model[0].lora_E["default"], expected.lora_E)


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_at_step_zero_is_closer_to_the_full_precision_model(bnb, bits) -> None:
    torch.manual_seed(0)
    fp = nn.Sequential(_linear(_weight(4)), nn.Tanh(), _linear(_weight(5).T.contiguous()))
    x = torch.randn(32, IN)
    with torch.no_grad():
        ref = fp(x)
        plain = nn.Sequential(
            *(quantize_linear(m, bits) if i != 1 else m for i, m in enumerate(fp))
        )
        inject_adapters(fp, ["0", "2"], rank=RANK, loftq_bits=bits, loftq_iter=2)
        loftq_out, plain_out = fp(x), plain(x)
    assert float((loftq_out - ref).norm()) < 0.9 * float((plain_out - ref).norm())


def test_conv1d_targets_are_transposed_into_linear_4bit(bnb) -> None:
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(OUT, IN)  # weight (in, out)
    with torch.no_grad():
        conv.weight.copy_(_weight(6).T)
    x = torch.randn(8, IN)
    ref = conv(x)
    model = nn.Sequential(conv)
    inject_adapters(model, ["0"], rank=RANK, loftq_bits=4)
    layer = model[0]
    assert isinstance(layer, SVDLinear4bit) and not layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    plain = float((_weight(6) - dequantize_weight(quantize_linear(_linear(_weight(6)), 4))).norm())
    assert float((_weight(6) - _effective(layer)).norm()) < 0.9 * plain
    torch.testing.assert_close(layer.bias, conv.bias)
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.1


def test_dtype_of_the_base_is_kept(bnb) -> None:
    base = _linear(_weight(7)).to(torch.bfloat16)
    model = nn.Sequential(base)
    inject_adapters(model, ["0"], rank=RANK, loftq_bits=4)
    layer = model[0]
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert layer.base_layer.weight.quant_state.dtype == torch.bfloat16
    assert layer.lora_A["default"].dtype == torch.float32
    out = layer(torch.randn(4, IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_quantized_or_unsupported_targets_are_refused_before_any_change(bnb) -> None:
    quantized = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type="nf4")
    model = nn.Sequential(_linear(_weight()), quantized.to("cpu"))
    with pytest.raises(ValueError, match=r"'1' is a Linear4bit.*full-precision model"):
        inject_adapters(model, ["0", "1"], rank=RANK, loftq_bits=4)
    assert type(model[0]) is nn.Linear  # nothing changed
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="is a Conv2d"):
        inject_adapters(conv, ["0"], rank=2, loftq_bits=4)


@pytest.mark.parametrize(
    ("bits", "iterations", "message"),
    [(3, 1, "loftq_bits=3 is not supported"), (4, 0, "loftq_iter=0 must be an integer >= 1")],
)
def test_bad_settings_say_what_to_change(bnb, bits, iterations, message) -> None:
    model = nn.Sequential(_linear(_weight()))
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, ["0"], rank=RANK, loftq_bits=bits, loftq_iter=iterations)
    with pytest.raises(ValueError, match=message):
        loftq_init(_weight(), RANK, bits, iterations)


def test_rank_above_the_matrix_rank_pads_with_zero_singular_values(bnb) -> None:
    w = _weight()[:, :16].contiguous()  # 16 columns: at most 16 singular values
    init = loftq_init(w, 20, 8)
    assert init.lora_E.shape == (20, 1)
    assert bool((init.lora_E[16:] == 0).all()) and bool((init.lora_E[:16] > 0).all())


def test_8bit_layers_use_the_threshold_transformers_loads_int8_models_with(bnb) -> None:
    # LLM.int8() with threshold 6.0 (BitsAndBytesConfig's default): outlier columns of the
    # activations in float16, so an int8-loaded base and a LoftQ 8-bit base compute alike
    layer = quantize_linear(_linear(_weight()), 8)
    assert layer.state.threshold == 6.0
    assert not layer.state.has_fp16_weights
