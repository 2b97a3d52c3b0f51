"""Fixes at the source in adalora_torch: ``ranknum`` stays the creation rank when
``inject_adapters`` builds a shrunk adapter; ``add_adapter`` / ``inject_adapters`` can leave the
active adapters alone; ``inject_adapters`` checks every module before it wraps the first."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adalora_hf import AdaLoraConfig, AdaLoraModel
from adalora_torch import SVDAdapter, SVDLinear, inject_adapters


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Linear(4, 3))


def test_rank_pattern_keeps_ranknum_and_the_scale() -> None:
    full, shrunk = _net(), _net()
    inject_adapters(full, ["0", "2"], rank=4, alpha=8.0, init_weights=False)
    inject_adapters(shrunk, ["0", "2"], rank=4, alpha=8.0, rank_pattern={"2": 2})
    layer, small = full[2], shrunk[2]
    assert small.r["default"] == 2 and small.lora_A["default"].shape == (2, 5)
    assert float(small.ranknum["default"]) == 4.0 == float(layer.ranknum["default"])
    # the shrunk adapter holding the kept triplets of the full one gives the same output
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        layer.lora_E["default"][~keep] = 0.0
        for kind, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            kept = getattr(layer, kind)["default"].index_select(dim, keep.nonzero().view(-1))
            getattr(small, kind)["default"].copy_(kept)
    x = torch.randn(3, 5)
    torch.testing.assert_close(small(x), layer(x), rtol=0, atol=0)


def test_zero_alpha_scales_by_the_creation_rank() -> None:
    layer = SVDLinear(nn.Linear(4, 4), 2, 0.0, ranknum=4)
    assert layer.scaling["default"] == 4.0 and float(layer.ranknum["default"]) == 4.0
    with pytest.raises(ValueError, match="must be an integer >= rank"):
        layer.add_adapter("other", 3, 8.0, ranknum=2)


def test_loaded_shrunk_adapter_keeps_ranknum_init_r(tmp_path, rel: SimpleNamespace) -> None:
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    rel.train_steps(model, range(1, 13))
    model.save_pretrained(tmp_path)
    loaded = AdaLoraModel.from_pretrained(rel.tiny_bert(), tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, SVDAdapter)]
    assert sorted(int(m.lora_A["default"].shape[0]) for m in layers) != [4] * len(layers)
    assert all(float(m.ranknum["default"]) == 4.0 for m in layers)
    model.eval()
    batch = {k: v for k, v in rel.batch(99).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_add_adapter_can_leave_the_active_adapters_alone() -> None:
    layer = SVDLinear(nn.Linear(4, 4), 2, 8.0)
    layer.add_adapter("other", 2, 8.0, activate=False)
    assert layer.active_adapters == ["default"]
    layer.add_adapter("third", 2, 8.0)
    assert layer.active_adapters == ["default", "third"]


def test_inject_without_activating(rel: SimpleNamespace) -> None:
    net = _net()
    inject_adapters(net, ["0"], rank=2)
    names = inject_adapters(net, ["0", "3"], adapter_name="new", rank=2, activate=False)
    assert names == ["0", "3"]
    assert net[0].active_adapters == ["default"]
    assert net[3].active_adapters == []  # a fresh layer with an inactive adapter: its base
    x = torch.randn(2, 4)
    torch.testing.assert_close(net[3](x), net[3].base_layer(x), rtol=0, atol=0)


def test_add_adapter_of_the_model_is_not_activated(rel: SimpleNamespace) -> None:
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule(modules_to_save=None)))
    other = AdaLoraConfig(**rel.schedule(modules_to_save=None), inference_mode=True)
    model.add_adapter("other", other)
    layers = [m for m in model.modules() if isinstance(m, SVDAdapter)]
    assert all(m.active_adapters == ["default"] for m in layers)


@pytest.mark.parametrize(
    ("targets", "kwargs", "match"),
    [
        ([r"0", r"1"], {}, "is a Tanh"),  # 0 is fine, 1 is not
        (["0", "2"], {"rank_pattern": {"9": 1}}, "not among the adapted modules"),
    ],
)
def test_inject_checks_every_module_before_wrapping_one(targets, kwargs, match) -> None:
    net = _net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match):
        inject_adapters(net, targets, rank=2, **kwargs)
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.Linear]
    assert net.state_dict().keys() == before.keys()
