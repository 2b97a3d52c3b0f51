"""PEFT's API surface around the adapters: the names PEFT code calls on a model, the config
fields it passes, PEFT's state-dict helpers. Where PEFT has the same call, both libraries run
it on equal tiny models and the results are compared."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import peft
import pytest
import torch
from packaging.version import Version
from peft.utils import get_peft_model_state_dict as peft_get_state

import adalora_hf
from adalora_hf import AdaLoraConfig, AdaLoraModel, PeftConfig, TaskType, get_peft_model

# the semantics matched are PEFT 0.21's (set_adapter(inference_mode=), set_requires_grad, the
# status fields); older PEFT has other ones, so those comparisons need the newer oracle
NEEDS_PEFT_021 = pytest.mark.skipif(
    Version(peft.__version__) < Version("0.21"), reason="the oracle is PEFT 0.21's API"
)

try:  # PEFT 0.18 and later; older PEFT has no such helper to compare with
    from peft.utils.save_and_load import get_base_model_state_dict as peft_base_state
except ImportError:
    peft_base_state = None


KINDS = ["bert", "gpt2", "t5", "llama"]


def _pair(make_base, kind: str, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    """Equal tiny models wrapped by ``get_peft_model`` here and in PEFT, same config."""
    ours = get_peft_model(make_base(kind, seed), AdaLoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_base(kind, seed), peft.AdaLoraConfig(**kw))
    return ours, theirs


def _grads(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_prefix_is_peft_s(make_base, schedule) -> None:
    ours, theirs = _pair(make_base, "bert", **schedule())
    assert ours.prefix == theirs.base_model.prefix == "lora_"


def test_task_type_values_are_peft_s() -> None:
    assert {t.name: t.value for t in TaskType} == {t.name: t.value for t in peft.TaskType}
    assert TaskType.CAUSAL_LM == "CAUSAL_LM"
    assert AdaLoraConfig(task_type=TaskType.SEQ_CLS).task_type == "SEQ_CLS"
    peft_type = AdaLoraConfig().peft_type
    assert peft_type == peft.PeftType.ADALORA == "ADALORA" and peft_type.value == "ADALORA"
    assert f"{peft_type}" == "ADALORA" and json.dumps(peft_type) == '"ADALORA"'


# -- config fields PEFT code passes --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_adapts_what_peft_adapts(make_base, schedule, kind, tiny) -> None:
    kw = schedule(target_modules="all-linear", task_type=tiny[kind].task_type)
    ours, theirs = _pair(make_base, kind, **kw)
    assert set(_grads(ours)) == set(_grads(theirs))
    assert _grads(ours) == _grads(theirs)
    head = "classifier" if kind == "bert" else "lm_head"
    assert not any(f"{head}.lora_A" in n for n in _grads(ours))


@pytest.mark.parametrize(
    "exclude", [["value"], ["1.attention.self.query", "dense"], r".*\.0\..*", "nothing"]
)
def test_exclude_modules_as_peft(make_base, schedule, exclude) -> None:
    kw = schedule(target_modules="all-linear", exclude_modules=exclude, task_type="SEQ_CLS")
    ours, theirs = _pair(make_base, "bert", **kw)
    assert set(_grads(ours)) == set(_grads(theirs))
    assert ours.peft_config["default"].exclude_modules == exclude


def test_exclude_everything_names_both_fields(make_base, schedule) -> None:
    cfg = AdaLoraConfig(**schedule(target_modules=["query"], exclude_modules=["query"]))
    with pytest.raises(ValueError, match="outside exclude_modules"):
        get_peft_model(make_base("bert"), cfg)


def test_adalora_only_bias_is_lora_only() -> None:
    assert AdaLoraConfig(bias="adalora_only").bias == "lora_only"


def test_use_dora_false_is_accepted_true_refused() -> None:
    assert AdaLoraConfig(use_dora=False).use_dora is False
    with pytest.raises(NotImplementedError, match="use_dora"):
        AdaLoraConfig(use_dora=True)


def test_a_config_with_the_new_fields_loads_in_peft(tmp_path, schedule) -> None:
    AdaLoraConfig(**schedule(exclude_modules=["key"])).save_pretrained(tmp_path)
    theirs = peft.AdaLoraConfig.from_pretrained(str(tmp_path))
    assert set(theirs.exclude_modules) == {"key"} and theirs.use_dora is False


def test_peft_config_from_pretrained(tmp_path, schedule) -> None:
    AdaLoraConfig(**schedule()).save_pretrained(tmp_path)
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, AdaLoraConfig) and isinstance(cfg, PeftConfig)
    assert cfg.init_r == schedule()["init_r"]
    other = tmp_path / "lora"
    peft.LoraConfig(r=4).save_pretrained(str(other))
    with pytest.raises(ValueError, match="not an AdaLoRA"):
        PeftConfig.from_pretrained(other)


# -- get_peft_model's keywords ---------------------------------------------------------------


def test_get_peft_model_keywords(make_base, schedule) -> None:
    model = get_peft_model(
        make_base("bert"),
        AdaLoraConfig(**schedule()),
        adapter_name="mine",
        autocast_adapter_dtype=True,
        revision="v1",
        low_cpu_mem_usage=True,
    )
    assert model.active_adapter == "mine" and model.peft_config["mine"].revision == "v1"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    get_peft_model(make_base("bert"), AdaLoraConfig(**schedule()), autocast_adapter_dtype=False)
    with pytest.raises(ValueError, match="mixed=True"):
        get_peft_model(make_base("bert"), AdaLoraConfig(**schedule()), mixed=True)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft(make_base, schedule, bert_batch, autocast) -> None:
    kw = schedule(init_lora_weights=False)
    ours = get_peft_model(
        make_base("bert").half(), AdaLoraConfig(**kw), autocast_adapter_dtype=autocast
    )
    theirs = peft.get_peft_model(
        make_base("bert").half(), peft.AdaLoraConfig(**kw), autocast_adapter_dtype=autocast
    )
    dtypes = {n: p.dtype for n, p in ours.named_parameters() if ".lora_" in n}
    assert dtypes == {n: p.dtype for n, p in theirs.named_parameters() if ".lora_" in n}
    assert set(dtypes.values()) == {torch.float32 if autocast else torch.float16}
    assert torch.isfinite(ours(input_ids=bert_batch["input_ids"]).logits).all()


def test_merging_a_deleted_or_merged_adapter(make_base, schedule) -> None:
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**schedule()))
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("nope")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert model.peft_config == {}


def test_disable_and_enable_adapter_layers(make_base, schedule, bert_batch) -> None:
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**schedule(init_lora_weights=False)))
    model.eval()
    adapted = model(**bert_batch).logits
    model.disable_adapter_layers()
    torch.testing.assert_close(
        model(**bert_batch).logits, model.get_base_model()(**bert_batch).logits
    )
    assert not torch.allclose(model(**bert_batch).logits, adapted)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(**bert_batch).logits, adapted)


# -- adapters and gradients ------------------------------------------------------------------


def _two_adapters(make_base, schedule) -> tuple[Any, Any]:
    ours, theirs = _pair(make_base, "bert", **schedule(init_lora_weights=False))
    second = schedule(inference_mode=True, init_lora_weights=False)
    ours.base_model.add_adapter("second", AdaLoraConfig(**second))
    theirs.add_adapter("second", peft.AdaLoraConfig(**second))
    return ours, theirs


@NEEDS_PEFT_021
@pytest.mark.parametrize("inference_mode", [False, True])
def test_set_adapter_moves_requires_grad_as_peft(make_base, schedule, inference_mode) -> None:
    ours, theirs = _two_adapters(make_base, schedule)
    assert _grads(ours) == _grads(theirs)
    for name in ("second", "default"):
        ours.set_adapter(name, inference_mode=inference_mode)
        theirs.set_adapter(name, inference_mode=inference_mode)
        assert _grads(ours) == _grads(theirs)
        assert any(v for n, v in _grads(ours).items() if n.endswith(name)) != inference_mode
    assert ours.base_model.trainable_adapter_name == "default"  # the allocator stays


@NEEDS_PEFT_021
def test_set_requires_grad_as_peft(make_base, schedule) -> None:
    ours, theirs = _two_adapters(make_base, schedule)
    for names, flag in [("second", True), (["default", "second"], False), ("default", True)]:
        ours.set_requires_grad(names, requires_grad=flag)
        theirs.set_requires_grad(names, requires_grad=flag)
        assert _grads(ours) == _grads(theirs)
    with pytest.raises(ValueError, match="Unknown adapters"):
        ours.set_requires_grad("nope")


def _status(status: Any) -> dict[str, Any]:
    out = dataclasses.asdict(status)
    out.pop("module_type", None)  # the layer class names differ (SVDLinear vs lora.Linear)
    return out


@NEEDS_PEFT_021
def test_status_reports_as_peft(make_base, schedule) -> None:
    ours, theirs = _two_adapters(make_base, schedule)
    ours.set_adapter("second")
    theirs.set_adapter("second")
    ours.merge_adapter()
    theirs.merge_adapter()
    ours_layers = [_status(s) for s in ours.get_layer_status()]
    assert ours_layers == [_status(s) for s in theirs.get_layer_status()]
    assert [_status(s) for s in adalora_hf.get_layer_status(ours)] == ours_layers
    mine, peft_s = _status(ours.get_model_status()), _status(theirs.get_model_status())
    assert mine == peft_s
    assert mine["merged_adapters"] == ["second"] and mine["adapter_model_type"] == "AdaLoraModel"
    with pytest.raises(ValueError, match="No adapter layers"):
        adalora_hf.get_layer_status(make_base("bert"))


def test_merging_twice_warns_and_changes_nothing(make_base, schedule, bert_batch) -> None:
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**schedule(init_lora_weights=False)))
    model.eval()
    model.merge_adapter()
    before = model(**bert_batch).logits
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(model(**bert_batch).logits, before)


def test_prepare_model_for_gradient_checkpointing(make_base, schedule) -> None:
    model = get_peft_model(make_base("llama"), AdaLoraConfig(**schedule()))
    base = model.get_base_model()
    assert model.prepare_model_for_gradient_checkpointing(base) is base
    ids = torch.tensor([[1, 2, 3]])
    assert base.get_input_embeddings()(ids).requires_grad


def test_resize_modules_by_rank_pattern(make_base, schedule, bert_batch) -> None:
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**schedule(init_lora_weights=False)))
    model.base_model.add_adapter(
        "frozen", AdaLoraConfig(**schedule(inference_mode=True, init_lora_weights=False))
    )
    path = "bert.encoder.layer.0.attention.self.query"
    keep = [True, False, True, False]
    model.resize_modules_by_rank_pattern({f"{path}.lora_E.frozen": keep}, "frozen")
    layer = model.get_base_model().get_submodule(path)
    assert layer.lora_A["frozen"].shape[0] == 2 and layer.lora_A["default"].shape[0] == 4
    with pytest.raises(ValueError, match="shrink_to_pattern"):
        model.resize_modules_by_rank_pattern({f"{path}.lora_E": keep}, "default")


# -- PEFT's state-dict helpers -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_helpers_round_trip_with_peft(make_base, schedule, kind) -> None:
    kw = schedule(
        init_lora_weights=False, modules_to_save=["classifier"] if kind == "bert" else None
    )
    ours, _ = _pair(make_base, kind, **kw)
    _, theirs = _pair(make_base, kind, seed=1, **kw)
    state = peft_get_state(theirs)
    result = adalora_hf.set_peft_model_state_dict(ours, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    mine = adalora_hf.get_peft_model_state_dict(ours)
    assert set(mine) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    if peft_base_state is not None:
        base_mine = adalora_hf.get_base_model_state_dict(ours)
        assert set(base_mine) == set(peft_base_state(theirs))


def test_state_dict_helpers_report_and_refuse(make_base, schedule) -> None:
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**schedule()))
    state = adalora_hf.get_peft_model_state_dict(model)
    dropped = next(iter(state))
    partial = {k: v for k, v in state.items() if k != dropped}
    partial["base_model.model.nowhere.lora_A"] = torch.zeros(1)
    result = adalora_hf.set_peft_model_state_dict(model, partial)
    assert result.unexpected_keys == ["base_model.model.nowhere.lora_A"]
    assert result.missing_keys == [dropped + ".default"]
    wrong = {dropped: torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        adalora_hf.set_peft_model_state_dict(model, wrong)
    with pytest.warns(UserWarning, match="Skipping"):
        adalora_hf.set_peft_model_state_dict(model, wrong, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="state_dict="):
        adalora_hf.get_peft_model_state_dict(model, state_dict=state)
    bare = AdaLoraModel(make_base("bert"), AdaLoraConfig(**schedule()))
    assert all(k.startswith("model.") for k in adalora_hf.get_peft_model_state_dict(bare))


def test_saved_config_json_has_peft_s_new_fields(tmp_path, schedule) -> None:
    AdaLoraConfig(**schedule(target_modules="all-linear")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["use_dora"] is False and data["exclude_modules"] is None


def test_set_base_model_state_dict_is_the_inverse(make_base, schedule, bert_batch) -> None:
    kw = schedule(init_lora_weights=False, modules_to_save=["classifier"])
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**kw))
    other = adalora_hf.get_base_model_state_dict(
        get_peft_model(make_base("bert", 1), AdaLoraConfig(**kw))
    )
    assert set(other) == set(make_base("bert").state_dict())
    result = adalora_hf.set_base_model_state_dict(model, other)
    assert result.missing_keys == [] and result.unexpected_keys == []
    mine = adalora_hf.get_base_model_state_dict(model)
    assert all(torch.equal(mine[k], v) for k, v in other.items())
    with pytest.raises(ValueError, match="strict=False"):
        adalora_hf.set_base_model_state_dict(model, {"nowhere.weight": torch.zeros(1)})
    partial = adalora_hf.set_base_model_state_dict(
        model, {"nowhere.weight": torch.zeros(1)}, strict=False
    )
    assert partial.unexpected_keys == ["nowhere.weight"] and partial.missing_keys
