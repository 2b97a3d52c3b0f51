"""Non-finite gradients through AdaLoraModel: the importance update of such a step is skipped
as a whole and counted, every EMA stays finite, every allocation keeps exactly the scheduled
budget, and training goes on; with ``torch.amp.GradScaler`` on CPU (fp16 overflows, bf16)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adalora_hf import AdaLoraConfig, AdaLoraModel
from adalora_torch import SVDAdapter


def _emas(model: AdaLoraModel) -> dict[str, torch.Tensor]:
    sd = model.rankallocator.state_dict()
    return {f"{g}.{k}": v for g in ("ema_sensitivity", "ema_uncertainty") for k, v in sd[g].items()}


def _kept(model: AdaLoraModel) -> int:
    layers = [m for m in model.modules() if isinstance(m, SVDAdapter)]
    masks = [m.keep["default"] for m in layers]
    assert all(k.dtype == torch.bool and k.shape == (4,) for k in masks)
    return int(sum(int(k.sum()) for k in masks))


def _check_final(model: AdaLoraModel) -> None:
    assert model.rankallocator.finalized
    assert model.total_rank() == 2 * 4  # target_r · n, exactly
    for m in model.modules():
        if isinstance(m, SVDAdapter):
            e = m.lora_E["default"].detach().view(-1)
            assert torch.isfinite(e).all()
            assert (e[~m.keep["default"]] == 0).all()


# steps of the schedule: warm-up 1..2, budgeting 3..9 (final allocation at 9), final 10..12
BAD = {2: ("lora_B", float("-inf")), 4: ("lora_A", float("inf")), 6: ("lora_E", float("nan"))}


def test_injected_inf_and_nan_are_skipped_and_counted(rel: SimpleNamespace) -> None:
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    layer = next(m for m in model.modules() if isinstance(m, SVDAdapter))
    model.train()
    for step in range(1, 13):
        model(**rel.batch(step)).loss.backward()
        if step in BAD:  # a bad gradient; the optimizer step is skipped, as GradScaler does
            kind, value = BAD[step]
            getattr(layer, kind)["default"].grad.view(-1)[1] = value
        else:
            optimizer.step()
        before = _emas(model)
        budget = model.update_and_allocate(step)
        optimizer.zero_grad()
        after = _emas(model)
        assert all(torch.isfinite(t).all() for t in after.values()), step
        if step in BAD:  # nothing of this step entered the EMAs
            assert all(torch.equal(after[k], before[k]) for k in before), step
        elif step < 9:  # the importance moves at every other step before the final one
            assert any(not torch.equal(after[k], before[k]) for k in before), step
        if step >= 3:  # every allocation keeps exactly the budget of its step
            assert _kept(model) == budget, step
        assert model.rankallocator.skipped_steps == sum(s <= step for s in BAD)
    _check_final(model)


@pytest.mark.parametrize(("dtype", "skipped"), [(torch.float16, 3), (torch.bfloat16, 0)])
def test_grad_scaler_on_cpu(dtype: torch.dtype, skipped: int, rel: SimpleNamespace) -> None:
    # init_scale 2^20 overflows fp16 gradients until the scaler has halved it to 2^17 (the
    # orthogonal penalty runs in float32 under autocast, so only the model's gradients overflow)
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1000)
    scaler_skips = adapter_overflows = 0
    adapter = [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]
    model.train()
    for step in range(1, 13):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**rel.batch(step)).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the importance sees the true gradients (inf on overflow)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scaler_skips += scaler.get_scale() < scale
        # the scaler also skips for the head's gradients; the importance only for the adapter's
        adapter_overflows += not all(torch.isfinite(p.grad).all() for p in adapter)
        budget = model.update_and_allocate(step)
        optimizer.zero_grad()
        assert all(torch.isfinite(t).all() for t in _emas(model).values()), step
        if step >= 3:
            assert _kept(model) == budget, step
    assert scaler_skips == skipped
    assert 0 < adapter_overflows <= skipped if skipped else adapter_overflows == 0
    # all of them before the final step
    assert model.rankallocator.skipped_steps == adapter_overflows
    _check_final(model)
    trained = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert torch.isfinite(trained).all()
