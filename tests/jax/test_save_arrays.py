"""``adalora_hf.save_adapter_arrays`` from NumPy arrays (no JAX needed): the files load onto
a torch model and give the masked full-rank adapter's outputs; bad input is refused before
anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="saving adapters needs torch")
pytest.importorskip("safetensors", reason="saving adapters needs safetensors")

from torch import nn  # noqa: E402

import adalora_hf  # noqa: E402
from adalora_torch import inject_adapters  # noqa: E402
from adalora_torch._layers import iter_svd_layers  # noqa: E402

LAYERS = {"fc1": (6, 5), "fc2": (5, 4)}  # name: (in, out)
R = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _config(**kw) -> adalora_hf.AdaLoraConfig:
    kw = {"target_modules": list(LAYERS), "init_r": R, "target_r": 2, "total_step": 10, **kw}
    return adalora_hf.AdaLoraConfig(**kw)


def _arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return {
        n: (rng.normal(size=(R, i)), rng.normal(size=(R,)), rng.normal(size=(o, R)))
        for n, (i, o) in LAYERS.items()
    }


MASKS = {"fc1": [True, False, True, True], "fc2": [False, True, False, False]}


@pytest.mark.parametrize("via", ["masks", "config"])
def test_saved_arrays_load_and_match_the_masked_adapter(tmp_path: Path, via: str) -> None:
    arrays = _arrays()
    if via == "masks":
        adalora_hf.save_adapter_arrays(tmp_path, arrays, config=_config(), masks=MASKS)
    else:
        pattern = {f"{n}.lora_E": m for n, m in MASKS.items()}
        adalora_hf.save_adapter_arrays(tmp_path, arrays, config=_config(rank_pattern=pattern))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {f"{n}.lora_E": m for n, m in MASKS.items()}
    assert saved["inference_mode"] is True

    # the reference: the full-rank adapter in torch with the masked E
    reference = Net()
    inject_adapters(reference, list(LAYERS), rank=R, alpha=8.0)
    for name, layer in iter_svd_layers(reference):
        a, e, b = arrays[name]
        keep = np.asarray(MASKS[name], dtype=float)
        layer.lora_A["default"].data = torch.tensor(a, dtype=torch.float32)
        layer.lora_E["default"].data = torch.tensor((e * keep)[:, None], dtype=torch.float32)
        layer.lora_B["default"].data = torch.tensor(b, dtype=torch.float32)
    loaded = adalora_hf.AdaLoraModel.from_pretrained(Net(), tmp_path)
    ranks = {n: layer.r["default"] for n, layer in iter_svd_layers(loaded)}
    assert ranks == {"model.fc1": 3, "model.fc2": 1}
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: {}, "arrays is empty"),
        (lambda a: {**a, "fc1": a["fc1"][:2]}, "must be (A, E, B)"),
        (lambda a: {**a, "fc1": (a["fc1"][0], a["fc1"][1][:3], a["fc1"][2])}, "with one rank r"),
        (
            lambda a: {**a, "fc1": tuple(x[:3] if x.shape[0] == R else x[:, :3] for x in a["fc1"])},
            "rank 3 but config.init_r is 4",
        ),
        (lambda a: {**a, "fc1": (a["fc1"][0].astype(int), *a["fc1"][1:])}, "has dtype int64"),
        (lambda a: {**a, "fc1": (a["fc1"][0] * np.nan, *a["fc1"][1:])}, "holds NaN or inf"),
        (lambda a: {**a, "proj": a["fc1"]}, "does not match ['proj']"),
    ],
)
def test_bad_arrays_are_refused_before_writing(tmp_path: Path, edit, message: str) -> None:
    out = tmp_path / "adapter"
    with pytest.raises(ValueError) as info:
        adalora_hf.save_adapter_arrays(out, edit(_arrays()), config=_config())
    assert message in str(info.value)
    assert not out.exists()


def test_masks_twice_or_of_another_length_are_refused(tmp_path: Path) -> None:
    pattern = {f"{n}.lora_E": m for n, m in MASKS.items()}
    with pytest.raises(ValueError, match="not both"):
        adalora_hf.save_adapter_arrays(
            tmp_path, _arrays(), config=_config(rank_pattern=pattern), masks=MASKS
        )
    with pytest.raises(ValueError, match=r"has 3 entries but config\.init_r is 4"):
        adalora_hf.save_adapter_arrays(
            tmp_path, _arrays(), config=_config(), masks={"fc1": [True, True, False]}
        )
    with pytest.raises(ValueError, match="has dtype float64: pass bools"):
        adalora_hf.save_adapter_arrays(
            tmp_path, _arrays(), config=_config(), masks={"fc1": [1.0, 0.0, 1.0, 1.0]}
        )
