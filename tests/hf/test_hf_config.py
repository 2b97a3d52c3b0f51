"""AdaLoraConfig: the documented fields and defaults, validation, adapter_config.json both ways.

Expected defaults come from the documented signature (PEFT v0.8.2's ``AdaLoraConfig`` API
reference); file round trips use peft 0.21's own config classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Any

import peft
import pytest
from packaging.version import Version

from adalora_core import budget_schedule
from adalora_hf import AdaLoraConfig

OLD_PEFT = Version(peft.__version__) < Version("0.21")  # older PEFT writes no peft_version


# field -> default, in the order of the documented signature
DOCUMENTED_DEFAULTS: list[tuple[str, Any]] = [
    ("peft_type", "ADALORA"),  # documented default None; always ADALORA once built
    ("auto_mapping", None),
    ("base_model_name_or_path", None),
    ("revision", None),
    ("task_type", None),
    ("inference_mode", False),
    ("r", 8),
    ("target_modules", None),
    ("lora_alpha", 8),
    ("lora_dropout", 0.0),
    ("fan_in_fan_out", False),
    ("bias", "none"),
    ("use_rslora", False),
    ("modules_to_save", None),
    ("init_lora_weights", True),
    ("layers_to_transform", None),
    ("layers_pattern", None),
    ("rank_pattern", None),
    ("alpha_pattern", {}),
    ("megatron_config", None),
    ("megatron_core", "megatron.core"),
    ("loftq_config", {}),
    ("target_r", 8),
    ("init_r", 12),
    ("tinit", 0),
    ("tfinal", 0),
    ("deltaT", 1),
    ("beta1", 0.85),
    ("beta2", 0.85),
    ("orth_reg_weight", 0.5),
    ("total_step", None),
    # PEFT's later LoRA fields, after the documented signature (exclude_modules works; the
    # others are accepted at the value where they do nothing)
    ("exclude_modules", None),
    ("use_dora", False),
    ("lora_bias", False),
    ("layer_replication", None),
    ("trainable_token_indices", None),
    ("target_parameters", None),
    ("use_qalora", False),
    ("ensure_weight_tying", False),
]


def test_fields_are_the_documented_signature_in_order() -> None:
    names = [f.name for f in dataclasses.fields(AdaLoraConfig)]
    assert names == [name for name, _ in DOCUMENTED_DEFAULTS]


@pytest.mark.parametrize(("name", "default"), DOCUMENTED_DEFAULTS)
def test_default(name: str, default: Any) -> None:
    assert getattr(AdaLoraConfig(), name) == default


def test_mutable_defaults_are_not_shared() -> None:
    a, b = AdaLoraConfig(), AdaLoraConfig()
    assert a.alpha_pattern is not b.alpha_pattern
    assert a.loftq_config is not b.loftq_config


def test_documented_example_builds_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = AdaLoraConfig(
            peft_type="ADALORA",
            task_type="SEQ_2_SEQ_LM",
            r=8,
            lora_alpha=32,
            target_modules=["q", "v"],
            lora_dropout=0.01,
        )
    assert cfg.target_modules == ["q", "v"] and cfg.total_step is None


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"target_r": 16, "init_r": 12}, "lower target_r or raise init_r"),
    ({"init_r": 0}, "init_r must be >= 1"),
    ({"target_r": -1}, r"must be >= 0, .*set target_r \(and init_r\) to 0 or more"),
    ({"init_r": 4.0}, "init_r must be an integer"),
    ({"tinit": 10, "tfinal": 20, "total_step": 30}, "lower tinit or tfinal, or raise total_step"),
    ({"tinit": 5, "total_step": 5}, "must be smaller than total_step - tfinal"),
    ({"total_step": 0}, "total_step must be a positive integer"),
    ({"total_step": 10.0}, "total_step must be an integer"),
    ({"tinit": 1.5}, "tinit must be an integer"),
    ({"beta2": "0.5"}, "beta2 must lie strictly between 0 and 1"),
    ({"tinit": -1}, "tinit and tfinal must be >= 0"),
    ({"deltaT": 0}, r"deltaT must be an integer >= 1 \(steps between two allocations\)"),
    ({"beta1": 1.0}, "beta1 must lie strictly between 0 and 1"),
    ({"beta2": 0.0}, "beta2 must lie strictly between 0 and 1"),
    ({"beta1": -0.5}, "beta1 must lie strictly between 0 and 1"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight must be a number >= 0"),
    ({"bias": "some"}, "bias='some' is unknown"),
    ({"lora_dropout": 1.0}, "lora_dropout must lie in"),
    ({"task_type": "TRANSLATE"}, "task_type='TRANSLATE' is unknown"),
    ({"peft_type": "LORA"}, "not an AdaLoRA config"),
    ({"target_modules": []}, "target_modules is an empty list"),
    ({"target_modules": 3}, "target_modules must be None"),
    ({"target_modules": "q|v", "layers_to_transform": [0]}, "cannot be combined"),
    ({"layers_pattern": "layers"}, "layers_pattern is set but layers_to_transform is not"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be an int"),
    ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ({"rank_pattern": {"q.lora_E": [1, 0]}}, "rank_pattern must map"),
    ({"init_lora_weights": "pissa"}, "not supported by AdaLoRA"),
    ({"loftq_config": {"loftq_bits": 4}}, "set init_lora_weights='loftq'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' needs loftq_config"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID)
def test_invalid_setting_says_what_to_change(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**kwargs)


UNSUPPORTED: list[tuple[dict[str, Any], str]] = [
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"use_rslora": True}, "use_rslora=True is not supported"),
    ({"alpha_pattern": {"q": 16}}, "alpha_pattern is not supported"),
]


@pytest.mark.parametrize(("kwargs", "message"), UNSUPPORTED)
def test_unsupported_feature_is_not_silent(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NotImplementedError, match=message):
        AdaLoraConfig(**kwargs)


def test_non_default_r_warns_that_init_r_counts() -> None:
    with pytest.warns(UserWarning, match="Set init_r instead of r"):
        AdaLoraConfig(r=16)


def test_total_step_may_stay_none_until_training() -> None:
    cfg = AdaLoraConfig(tinit=10, tfinal=20)
    cfg.check_schedule(require_total_step=False)
    with pytest.raises(ValueError, match="AdaLoraCallback"):
        cfg.check_schedule()
    cfg.total_step = 25
    with pytest.raises(ValueError, match="raise total_step"):
        cfg.check_schedule()


def test_sets_and_enums_are_normalized() -> None:
    cfg = AdaLoraConfig(
        target_modules={"v", "q"},
        task_type=peft.TaskType.CAUSAL_LM,
        peft_type=peft.PeftType.ADALORA,
    )
    assert cfg.target_modules == ["q", "v"]
    assert cfg.task_type == "CAUSAL_LM" and type(cfg.task_type) is str
    # peft_type is this library's PeftType.ADALORA: a str, equal to and written as "ADALORA"
    assert cfg.peft_type == "ADALORA" and isinstance(cfg.peft_type, str)
    assert json.loads(cfg.to_json_bytes())["peft_type"] == "ADALORA"


def test_worked_example_of_the_docstring() -> None:
    # tinit=10, tfinal=20, total_step=100 over steps 1..100: 10 warm-up, 70 budgeting, 20 final
    kw = dict(init_budget=48, target_budget=32, tinit=10, tfinal=20, total_step=100, deltaT=1)
    phases = []
    for step in range(1, 101):
        _, mask = budget_schedule(step, **kw)
        phases.append("warm-up" if not mask else ("final" if step > 80 else "budgeting"))
    assert phases.count("warm-up") == 10
    assert phases.count("budgeting") == 70
    assert phases.count("final") == 20
    assert budget_schedule(80, **kw)[0] == 32  # the final allocation reaches the target
    doc = AdaLoraConfig.__doc__ or ""
    assert "10 warm-up" in doc and "70 budgeting" in doc and "20 final" in doc


# -- adapter_config.json ---------------------------------------------------------------------


def _kwargs() -> dict[str, Any]:
    return dict(
        init_r=6,
        target_r=3,
        tinit=5,
        tfinal=7,
        deltaT=3,
        beta1=0.8,
        beta2=0.9,
        orth_reg_weight=0.25,
        total_step=50,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        bias="lora_only",
        task_type="SEQ_CLS",
    )


def test_written_config_loads_in_peft(tmp_path) -> None:
    ours = AdaLoraConfig(**_kwargs(), rank_pattern={"a.query.lora_E": [True, False] * 3})
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA"
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.AdaLoraConfig)
    for name, value in _kwargs().items():
        got = getattr(theirs, name)
        got = getattr(got, "value", got)
        assert (sorted(got) if isinstance(got, set) else got) == value, name
    assert theirs.rank_pattern == {"a.query.lora_E": [True, False] * 3}


@pytest.mark.parametrize("peft_cls", [peft.AdaLoraConfig, peft.LoraConfig])
def test_config_written_by_peft_loads_here(tmp_path, peft_cls: type) -> None:
    if peft_cls is peft.AdaLoraConfig:
        theirs = peft_cls(**_kwargs())
        theirs.save_pretrained(str(tmp_path))
        ours = AdaLoraConfig.from_pretrained(tmp_path)
        for name, value in _kwargs().items():
            got = getattr(ours, name)
            # PEFT keeps target_modules as a set and writes it in set order
            assert (sorted(got) if name == "target_modules" else got) == value, name
        # PEFT writes fields this class does not know (peft_version, use_dora, ...): ignored
        written = json.loads((tmp_path / "adapter_config.json").read_text())
        assert "use_dora" in written and ("peft_version" in written or OLD_PEFT)
    else:
        peft_cls(r=4, target_modules=["q"]).save_pretrained(str(tmp_path))
        with pytest.raises(ValueError, match="LORA adapter config, not an AdaLoRA one"):
            AdaLoraConfig.from_pretrained(tmp_path)


def test_unknown_fields_are_logged_at_debug(tmp_path, caplog) -> None:
    data = AdaLoraConfig(total_step=10).to_dict()
    data.update({"peft_version": "0.99.0", "some_future_field": [1, 2]})
    with caplog.at_level(logging.DEBUG, logger="adalora_hf._config"):
        cfg = AdaLoraConfig.from_dict(data)
    assert cfg.total_step == 10
    assert "some_future_field" in caplog.text and "peft_version" in caplog.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("lora_bias", True),
        ("layer_replication", [[0, 1]]),
        ("use_qalora", True),
    ],
)
def test_peft_features_that_change_the_adapter_are_refused(field: str, value: Any) -> None:
    data = AdaLoraConfig(total_step=10).to_dict()
    data[field] = value
    with pytest.raises(NotImplementedError, match=field):
        AdaLoraConfig.from_dict(data)
    with pytest.raises(NotImplementedError, match=field):
        AdaLoraConfig(**{field: value})


def test_rslora_from_a_peft_file_is_dropped_with_a_warning() -> None:
    data = AdaLoraConfig(total_step=10).to_dict()
    data["use_rslora"] = True
    with pytest.warns(UserWarning, match="PEFT's AdaLoRA ignores"):
        cfg = AdaLoraConfig.from_dict(data)
    assert cfg.use_rslora is False


def test_round_trip_here(tmp_path) -> None:
    cfg = AdaLoraConfig(**_kwargs())
    cfg.save_pretrained(tmp_path)
    assert AdaLoraConfig.from_pretrained(tmp_path) == cfg
    assert AdaLoraConfig.from_pretrained(tmp_path / "adapter_config.json") == cfg


def test_missing_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        AdaLoraConfig.from_pretrained(tmp_path / "nope")
