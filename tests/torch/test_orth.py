"""orthogonal_penalty against the direct formula of PEFT's AdaLoraModel.forward:
mean over A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, one matrix at a time."""

from __future__ import annotations

import torch

from adalora_torch import inject_adapters, orthogonal_penalty


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
