"""``AdaLoraConfig.warn_if_schedule_hurts``: PEFT's default schedule (no warm-up, no final
phase) warns once, with the values to set, when training starts; a recommended one does not."""

from __future__ import annotations

import warnings

import pytest

from adalora_hf import AdaLoraConfig, AdaLoraModel


def _caught(config: AdaLoraConfig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.warn_if_schedule_hurts()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_peft_defaults_warn_with_the_values_to_set() -> None:
    (message,) = _caught(AdaLoraConfig(init_r=12, target_r=4, total_step=1000))
    assert "tinit=0 and tfinal=0" in message
    assert "Set tinit=100 and tfinal=200" in message


@pytest.mark.parametrize(
    ("kw", "warns"),
    [
        ({"tinit": 100, "tfinal": 200}, False),  # the recommended schedule
        ({"tinit": 50, "tfinal": 50}, False),  # 5% each: the threshold
        ({"tinit": 100, "tfinal": 49}, True),  # final phase too short
        ({"tinit": 49, "tfinal": 200}, True),  # warm-up too short
        ({"total_step": None}, False),  # not known yet
        ({"target_r": 12}, False),  # nothing pruned
    ],
)
def test_the_rule(kw: dict, warns: bool) -> None:
    config = AdaLoraConfig(**{"init_r": 12, "target_r": 4, "total_step": 1000, **kw})
    assert bool(_caught(config)) == warns


def test_the_model_warns_once_when_training_starts(make_base) -> None:
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=100, target_modules=["query"])
    model = AdaLoraModel(make_base("bert"), config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.set_total_step(200)
        model.set_total_step(300)
    schedule = [w for w in caught if "AdaLoRA schedule" in str(w.message)]
    assert len(schedule) == 1 and "total_step=200" in str(schedule[0].message)
