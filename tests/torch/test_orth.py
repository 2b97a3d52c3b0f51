"""orthogonal_penalty against the direct formula of PEFT's AdaLoraModel.forward:
mean over A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, one matrix at a time."""

from __future__ import annotations

import torch

from adalora_torch import inject_adapters, orthogonal_penalty
from adalora_torch._orth import _Penalty


def direct_penalty(model, adapter_name):
    norms = []
    for name, p in model.named_parameters():
        if name.endswith(f"lora_A.{adapter_name}"):
            norms.append(torch.linalg.norm(p @ p.T - torch.eye(p.shape[0]), "fro"))
        elif name.endswith(f"lora_B.{adapter_name}"):
            norms.append(torch.linalg.norm(p.T @ p - torch.eye(p.shape[1]), "fro"))
    return torch.stack(norms).mean()


def test_penalty_equals_direct_formula_over_mixed_shapes(make_model):
    model = make_model()
    inject_adapters(model, ["q", "v", "embed", "head"], rank=3, rank_pattern={"layers.1.v": 2})
    got = orthogonal_penalty(model)
    assert got.dim() == 0
    torch.testing.assert_close(got, direct_penalty(model, "default"))


def test_penalty_has_gradients_and_picks_the_adapter(make_model):
    model = make_model(n_layers=1)
    inject_adapters(model, ["q"], rank=3)
    inject_adapters(model, ["q"], adapter_name="default2", rank=3)
    q = model.layers[0].q
    q.set_adapter("default2")
    torch.testing.assert_close(orthogonal_penalty(model), direct_penalty(model, "default2"))
    p = orthogonal_penalty(model, adapter_name="default")
    torch.testing.assert_close(p, direct_penalty(model, "default"))
    p.backward()
    assert q.lora_A["default"].grad is not None and q.lora_A["default2"].grad is None


def test_penalty_is_zero_without_adapters(make_model):
    assert orthogonal_penalty(make_model()).item() == 0.0


def test_orthonormal_factors_give_zero():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    inject_adapters(model, ["0"], rank=3)
    q = model[0]
    with torch.no_grad():
        q.lora_A["default"].copy_(torch.eye(6)[:3])
        q.lora_B["default"].copy_(torch.eye(5)[:, :3])
    assert orthogonal_penalty(model).item() == 0.0


def test_hand_written_backward_passes_gradcheck_in_float64():
    # the closed-form backward against finite differences, over groups of A and B matrices
    # (several per group, several shapes), as orthogonal_penalty lays them out
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (3, 5), (4, 3), (4, 3), (2, 6), (7, 2)]
    mats = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    layout = [(True, 0, 2), (False, 2, 2), (True, 4, 1), (False, 5, 1)]

    def penalty(*m: torch.Tensor) -> torch.Tensor:
        return _Penalty.apply(layout, len(m), *m)

    assert torch.autograd.gradcheck(penalty, tuple(mats), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_public_penalty_gradients_equal_autograd_of_the_direct_formula_in_float64(make_model):
    model = make_model()
    inject_adapters(model, ["q", "v", "embed", "head"], rank=3, rank_pattern={"layers.1.v": 2})
    model.double()
    params = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    ours = torch.autograd.grad(orthogonal_penalty(model), params)
    direct = torch.autograd.grad(direct_penalty(model, "default"), params)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
