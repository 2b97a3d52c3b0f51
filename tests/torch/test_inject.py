"""inject_adapters and mark_only_adapters_trainable on small models (TinyNet, tiny GPT-2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_torch import (
    SVDAdapter,
    SVDEmbedding,
    SVDLinear,
    inject_adapters,
    mark_only_adapters_trainable,
)


def test_list_targets_match_name_or_suffix(make_model):
    model = make_model()
    names = inject_adapters(model, ["q", "layers.1.v"], rank=2)
    assert names == ["layers.0.q", "layers.1.q", "layers.1.v", "layers.2.q"]
    assert isinstance(model.layers[0].q, SVDLinear)
    assert isinstance(model.layers[0].v, nn.Linear)  # "v" alone was not a target
    assert dict(model.named_modules())["layers.1.v.base_layer"] is model.layers[1].v.base_layer


def test_regex_target_is_a_full_match(make_model):
    model = make_model()
    assert inject_adapters(model, r"layers\.[02]\.(q|v)|embed") == [
        "embed",
        "layers.0.q",
        "layers.0.v",
        "layers.2.q",
        "layers.2.v",
    ]
    assert isinstance(model.embed, SVDEmbedding)
    with pytest.raises(ValueError, match="No module"):
        inject_adapters(make_model(), r"q")  # "q" is no full module name


def test_injection_keeps_outputs_and_requires_grad(make_model, make_ids):
    model, ids = make_model(), make_ids()
    before = model(ids)
    names = inject_adapters(model, ["q", "v", "head"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{m}.ranknum.default" for m in names}  # base weights untouched
    torch.testing.assert_close(model(ids), before)  # E = 0 at init
    assert isinstance(model.head, SVDAdapter)


@pytest.mark.parametrize(
    ("layers_to_transform", "layers_pattern", "expected"),
    [
        (1, None, ["layers.1.q", "layers.1.v"]),
        ([0, 2], "layers", ["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"]),
        ([0], ["blocks", "layers"], ["layers.0.q", "layers.0.v"]),
    ],
)
def test_layers_to_transform(make_model, layers_to_transform, layers_pattern, expected):
    names = inject_adapters(
        make_model(),
        ["q", "v"],
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    assert names == expected


def test_nothing_matches_lists_module_names(make_model):
    with pytest.raises(ValueError, match=r"targets=\['query'\].*layers\.0\.q"):
        inject_adapters(make_model(), ["query"])
    with pytest.raises(ValueError, match="layers_pattern='blocks'"):
        inject_adapters(make_model(), ["q"], layers_to_transform=0, layers_pattern="blocks")


def test_unsupported_type_says_what_is_supported(make_model):
    with pytest.raises(ValueError, match=r"'layers\.0\.norm'.*LayerNorm.*nn\.Linear"):
        inject_adapters(make_model(), ["norm"])


def test_second_adapter_goes_into_existing_layers(make_model):
    model = make_model()
    inject_adapters(model, ["q"], rank=3)
    names = inject_adapters(model, r".*\.q", adapter_name="efaul", rank=2, init_weights=False)
    assert names == ["layers.0.q", "layers.1.q", "layers.2.q"]  # no base_layer wrapped
    q = model.layers[0].q
    assert isinstance(q.base_layer, nn.Linear)
    assert q.r == {"default": 3, "efaul": 2}
    assert "layers.0.q.lora_A.efaul" in dict(model.named_parameters())


def test_rank_pattern_sets_rank_per_module(make_model):
    model = make_model()
    inject_adapters(model, ["q"], rank=4, rank_pattern={"layers.1.q": 1, "layers.2.q": 0})
    assert [model.layers[i].q.r["default"] for i in range(3)] == [4, 1, 0]
    assert model.layers[2].q.lora_A["default"].shape == (0, 8)


@pytest.mark.parametrize(
    ("bias", "trainable_biases"),
    [("none", set()), ("lora_only", {"layers.0.q.base_layer.bias"}), ("all", None)],
)
def test_mark_only_adapters_trainable(make_model, bias, trainable_biases):
    model = make_model(n_layers=1)
    inject_adapters(model, ["q"])
    inject_adapters(model, ["q"], adapter_name="other")
    mark_only_adapters_trainable(model, bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"layers.0.q.lora_{k}.default" for k in "AEB"}
    biases = {n for n in trainable if n.endswith("bias")}
    assert trainable - biases == adapters
    if trainable_biases is None:
        assert biases == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    else:
        assert biases == trainable_biases


def test_mark_only_adapters_trainable_rejects_bad_bias(make_model):
    with pytest.raises(ValueError, match="lora_only"):
        mark_only_adapters_trainable(make_model(), bias="some")


def test_parameter_names_and_outputs_match_peft(make_model, make_ids):
    """Parity with PEFT's AdaLoRA (test-only oracle): same parameter names, same outputs."""
    peft = pytest.importorskip("peft")
    ours, theirs, ids = make_model(), make_model(), make_ids()
    inject_adapters(ours, ["q", "v"], rank=3, alpha=6.0, init_weights=False)
    config = peft.AdaLoraConfig(target_modules=["q", "v"], init_r=3, lora_alpha=6.0, total_step=10)
    theirs = peft.get_peft_model(theirs, config)
    prefix = "base_model.model."
    theirs_sd = {k.removeprefix(prefix): v for k, v in theirs.state_dict().items()}
    assert set(ours.state_dict()) == set(theirs_sd)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # E too, so the update is large
    theirs.base_model.model.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(ids), theirs(ids))


def test_gpt2_conv1d_is_injected_with_fan_in_fan_out():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=8, n_head=2, vocab_size=17, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 17, (1, 5))
    names = inject_adapters(model, ["c_attn"], rank=2, layers_to_transform=1, layers_pattern="h")
    assert names == ["h.1.attn.c_attn"]
    layer = model.h[1].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A["default"].shape == (2, 8)
    assert layer.lora_B["default"].shape == (24, 2)
    with torch.no_grad():
        layer.lora_E["default"].fill_(1.0)
    y = model(ids).last_hidden_state
    layer.merge()
    torch.testing.assert_close(model(ids).last_hidden_state, y, rtol=1e-4, atol=1e-5)
