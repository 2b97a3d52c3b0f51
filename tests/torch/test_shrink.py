"""shrink_to_pattern and to_lora_state_dict after a (simulated) final allocation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adalora_hf._serialization import to_peft_keys
from adalora_torch import (
    SVDAdapter,
    inject_adapters,
    mark_only_adapters_trainable,
    shrink_to_pattern,
    to_lora_state_dict,
)

MASKS = {  # what a final allocation might leave: module -> keep-mask over rank 4
    "layers.0.q": [True, False, True, False],
    "layers.0.v": [False, False, False, True],
    "layers.1.q": [True, True, True, True],
    "layers.1.v": [False, False, False, False],
    "embed": [False, True, True, False],
}


def allocate(model: nn.Module, masks=MASKS) -> None:
    """Do what the rank allocator does: record keep[adapter] and zero the masked E."""
    for name, m in model.named_modules():
        if isinstance(m, SVDAdapter):
            keep = torch.tensor(masks[name])
            m.keep["default"] = keep
            with torch.no_grad():
                m.lora_E["default"][~keep] = 0.0


@pytest.fixture
def adapted(make_model, make_ids):
    """TinyNet (2 blocks) with adapters on q, v, embed (rank 4, E random), its ids."""
    model = make_model(n_layers=2)
    inject_adapters(model, ["q", "v", "embed"], rank=4, init_weights=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDAdapter):
                m.lora_E["default"].normal_(0.0, 1.0)
    return model, make_ids()


def adapter_params(model):
    return [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]


def test_shrink_keeps_outputs_and_counts_parameters(adapted):
    model, ids = adapted
    allocate(model)
    before = model(ids).detach()
    kept = shrink_to_pattern(model)
    assert kept == {name: sum(mask) for name, mask in MASKS.items()}
    torch.testing.assert_close(model(ids), before)
    expected = sum(k * (8 + 1 + 8) if n != "embed" else k * (13 + 1 + 8) for n, k in kept.items())
    assert sum(p.numel() for p in adapter_params(model)) == expected
    assert model.layers[0].q.ranknum["default"].item() == 4.0  # r₀ unchanged


def test_shrink_with_explicit_rank_pattern(adapted):
    model, ids = adapted
    allocate(model)
    before = model(ids).detach()
    for m in model.modules():
        if isinstance(m, SVDAdapter):
            m.keep.clear()
    assert shrink_to_pattern(model, rank_pattern=MASKS)["layers.0.v"] == 1
    torch.testing.assert_close(model(ids), before)


def test_shrink_errors_say_what_to_do(adapted):
    model, _ = adapted
    with pytest.raises(ValueError, match="after the final allocation"):
        shrink_to_pattern(model)
    with pytest.raises(ValueError, match=r"no entry for 'layers\.0\.q'"):
        shrink_to_pattern(model, rank_pattern={"embed": [True] * 4})
    bad = {**MASKS, "layers.0.q": [True, False]}
    with pytest.raises(ValueError, match="has 2 entries"):
        shrink_to_pattern(model, rank_pattern=bad)
    with pytest.raises(ValueError, match="no SVD adapter layer"):
        shrink_to_pattern(model, adapter_name="other")


def train_steps(model, optimizer, ids, target, n):
    losses = []
    for _ in range(n):
        loss = nn.functional.mse_loss(model(ids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        allocate_if_masked(model)
        losses.append(loss.item())
    return losses


def allocate_if_masked(model):
    # after the final allocation the allocator re-applies the pattern every step
    for m in model.modules():
        if isinstance(m, SVDAdapter) and "default" in m.keep:
            with torch.no_grad():
                m.lora_E["default"][~m.keep["default"]] = 0.0


def test_training_continues_after_shrink_with_optimizer_state(adapted):
    model, ids = adapted
    target = torch.randn(model(ids).shape, generator=torch.Generator().manual_seed(5))
    mark_only_adapters_trainable(model)
    optimizer = torch.optim.Adam(adapter_params(model), lr=1e-2)
    allocate(model)
    train_steps(model, optimizer, ids, target, 3)

    # the same run, unshrunk with masks re-applied, is the reference trajectory
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(adapter_params(reference), lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no aliasing

    old_a = model.layers[0].q.lora_A["default"]
    old_exp_avg = optimizer.state[old_a]["exp_avg"].clone()
    shrink_to_pattern(model, optimizer)
    new_a = model.layers[0].q.lora_A["default"]
    assert old_a not in optimizer.state
    assert all(p is not old_a for g in optimizer.param_groups for p in g["params"])
    torch.testing.assert_close(optimizer.state[new_a]["exp_avg"], old_exp_avg[[0, 2]])
    for p in adapter_params(model):
        state = optimizer.state[p]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        assert float(state["step"]) == 3.0

    losses = train_steps(model, optimizer, ids, target, 5)
    ref_losses = train_steps(reference, ref_opt, ids, target, 5)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))


def test_lora_export_reproduces_the_delta(adapted):
    model, _ = adapted
    allocate(model)
    tensors, ranks = to_lora_state_dict(model)
    assert ranks == {n: sum(m) for n, m in MASKS.items() if sum(m) > 0}
    # keys relative to the model, PEFT's LoRA layer names under each module
    assert set(tensors) == {
        f"{n}.{kind}"
        for n in ranks
        for kind in (
            ("lora_embedding_A", "lora_embedding_B")
            if n == "embed"
            else ("lora_A.weight", "lora_B.weight")
        )
    }
    q = model.layers[0].q
    a = tensors["layers.0.q.lora_A.weight"]
    b = tensors["layers.0.q.lora_B.weight"]
    assert a.shape == (2, 8) and b.shape == (8, 2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(x @ a.T @ b.T, x @ q.get_delta_weight("default").T)
    emb_a = tensors["embed.lora_embedding_A"]
    emb_b = tensors["embed.lora_embedding_B"]
    torch.testing.assert_close((emb_b @ emb_a).T, model.embed.get_delta_weight("default"))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.proj = Conv1D(5, 4)  # (in=4, out=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (N, 4, H, W)
        return self.proj(h.permute(0, 2, 3, 1).contiguous())  # (N, H, W, 5)


def load_into_peft_lora(base, tensors, ranks, **config_kwargs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        target_modules=list(ranks),
        r=8,
        lora_alpha=8,
        rank_pattern=ranks,
        alpha_pattern=ranks,
        **config_kwargs,
    )
    lora = peft.get_peft_model(base, config)
    result = peft.set_peft_model_state_dict(lora, to_peft_keys(tensors))
    assert not result.unexpected_keys
    return lora


def test_lora_export_loads_into_peft_with_same_outputs(adapted, make_model):
    """PEFT's LoRA (test-only oracle) with r = alpha = k per module gives the same outputs."""
    model, ids = adapted
    allocate(model)
    tensors, ranks = to_lora_state_dict(model)
    lora = load_into_peft_lora(make_model(n_layers=2), tensors, ranks).eval()
    torch.testing.assert_close(lora(ids), model(ids), rtol=1e-5, atol=1e-6)
    shrink_to_pattern(model)  # exporting a shrunk model gives the same file
    tensors2, ranks2 = to_lora_state_dict(model)
    assert ranks2 == ranks and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)


def test_lora_export_of_conv2d_and_conv1d_loads_into_peft():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = ConvNet()
    base = copy.deepcopy(model)
    inject_adapters(model, ["conv", "proj"], rank=3, init_weights=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDAdapter):
                m.lora_E["default"].normal_()
                m.keep["default"] = torch.tensor([True, False, True])
                m.lora_E["default"][1] = 0.0
    x = torch.randn(2, 3, 6, 6)
    tensors, ranks = to_lora_state_dict(model)
    assert tensors["conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert tensors["conv.lora_B.weight"].shape == (4, 2, 1, 1)
    lora = load_into_peft_lora(base, tensors, ranks, fan_in_fan_out=True)
    torch.testing.assert_close(lora(x), model(x), rtol=1e-5, atol=1e-6)
