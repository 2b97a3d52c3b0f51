"""Bad inputs fail with a documented error type and a message that says what to change, and
change nothing: the model's tensors stay bitwise equal and no file under the test's directory
changes (bytes or modification time) or appears.

The cases are the table in docs/errors.md, read from there: each row's id names a function
below that sets the case up and returns the failing call; the row gives the error type (exactly,
not a subclass) and an excerpt of the message. A second test checks that the table and the
functions list the same cases.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adalora_hf import AdaLoraConfig, AdaLoraModel
from adalora_torch import inject_adapters

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.bert.encoder.layer."
Q0 = "bert.encoder.layer.0.attention.self.query"


@dataclass
class Row:
    id: str
    error: str
    message: str


def _table() -> list[Row]:
    """The rows of docs/errors.md's table(s) whose first cell is a backquoted case id."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            error = cells[2].strip("`")
            rows.append(Row(cells[0].strip("`"), error, cells[3]))
    return rows


ROWS = _table()


@dataclass
class Env:
    """What a case needs: a private directory, fresh models, saved adapters to copy."""

    tmp: Path
    rel: SimpleNamespace
    adapters: dict[str, Path]
    watched: list[nn.Module] = field(default_factory=list)

    def watch(self, model: Any) -> Any:
        self.watched.append(model)
        return model

    def bert(self, **kw: Any) -> nn.Module:
        return self.watch(self.rel.tiny_bert(**kw))

    def config(self, **overrides: Any) -> AdaLoraConfig:
        return AdaLoraConfig(**self.rel.schedule(**overrides))

    def model(self, steps: int = 0, **overrides: Any) -> AdaLoraModel:
        model = AdaLoraModel(self.rel.tiny_bert(), self.config(**overrides))
        if steps:
            self.rel.train_steps(model, range(1, steps + 1))
        return self.watch(model)

    def adapter(self, which: str = "final") -> Path:
        """A copy of a saved adapter (``final``: shrunk by its rank pattern; ``mid``: saved
        during budgeting; ``gpt2``, ``wide``: for other base models)."""
        out = self.tmp / f"adapter-{which}"
        shutil.copytree(self.adapters[which], out)
        return out

    def edit_config(self, path: Path, edit: Callable[[dict], None], unstamp: bool = False) -> None:
        data = json.loads((path / CONFIG).read_text())
        edit(data)
        (path / CONFIG).write_text(json.dumps(data))
        if unstamp:  # as PEFT writes it: no copy of the config in the weights' metadata
            self.edit_weights(path, lambda t: None, metadata={"format": "pt"})

    def edit_weights(
        self,
        path: Path,
        edit: Callable[[dict[str, torch.Tensor]], None],
        metadata: dict[str, str] | None = None,
        name: str = WEIGHTS,
    ) -> None:
        with safe_open(str(path / name), framework="pt") as f:
            kept = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        edit(tensors)
        save_file(tensors, str(path / name), metadata=metadata or kept)


CASES: dict[str, Callable[[Env], Callable[[], object]]] = {}


def case(name: str) -> Callable[[Callable[[Env], Callable[[], object]]], Any]:
    def register(make: Callable[[Env], Callable[[], object]]) -> Any:
        assert name not in CASES, name
        CASES[name] = make
        return make

    return register


# -- configurations -------------------------------------------------------------------------------
_CONFIGS: dict[str, dict[str, Any]] = {
    "config-target-r-above-init-r": {"init_r": 4, "target_r": 8},
    "config-tinit-past-budgeting": {"tinit": 10, "tfinal": 5, "total_step": 12},
    "config-beta-out-of-range": {"beta1": 1.0},
    "config-deltat-zero": {"deltaT": 0},
    "config-unknown-bias": {"bias": "some"},
    "config-rslora": {"use_rslora": True},
    "config-init-r-zero": {"init_r": 0, "target_r": 0},
    "config-empty-targets": {"target_modules": []},
    "config-dropout-one": {"lora_dropout": 1.0},
    "config-total-step-negative": {"total_step": -5},
    "config-peft-type-lora": {"peft_type": "LORA"},
    "config-layers-with-regex": {"target_modules": r".*query", "layers_to_transform": [0]},
    "config-alpha-pattern": {"alpha_pattern": {"query": 16}},
    "config-loftq-without-config": {"init_lora_weights": "loftq"},
    "config-loftq-config-without-loftq": {"loftq_config": {"loftq_bits": 4}},
    "config-loftq-bits": {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 2}},
}
for _name, _kw in _CONFIGS.items():
    case(_name)(lambda env, kw=_kw: lambda: AdaLoraConfig(**kw))


# -- wrapping a model ----------------------------------------------------------------------------
@case("targets-match-nothing")
def _targets_match_nothing(env: Env) -> Callable[[], object]:
    base, config = env.bert(), env.config(target_modules=["nope"])
    return lambda: AdaLoraModel(base, config)


@case("target-unsupported-layer")
def _target_unsupported(env: Env) -> Callable[[], object]:
    # the queries come first in module order: nothing may be wrapped before the Tanh fails
    base, config = env.bert(), env.config(target_modules=["query", "pooler.activation"])
    return lambda: AdaLoraModel(base, config)


@case("layers-to-transform-out-of-range")
def _layers_out_of_range(env: Env) -> Callable[[], object]:
    base, config = env.bert(), env.config(layers_to_transform=[7])
    return lambda: AdaLoraModel(base, config)


@case("modules-to-save-names-nothing")
def _modules_to_save_nothing(env: Env) -> Callable[[], object]:
    base, config = env.bert(), env.config(modules_to_save=["classifer"])
    return lambda: AdaLoraModel(base, config)


@case("second-trainable-adapter")
def _second_trainable(env: Env) -> Callable[[], object]:
    model, config = env.model(), env.config()
    return lambda: model.add_adapter("other", config)


@case("adapter-name-exists")
def _adapter_name_exists(env: Env) -> Callable[[], object]:
    model, config = env.model(), env.config(inference_mode=True)
    return lambda: model.add_adapter("default", config)


@case("adapter-name-with-dot")
def _adapter_name_with_dot(env: Env) -> Callable[[], object]:
    base, config = env.bert(), env.config()
    return lambda: AdaLoraModel(base, config, "my.adapter")


@case("config-not-adalora")
def _config_not_adalora(env: Env) -> Callable[[], object]:
    base = env.bert()
    return lambda: AdaLoraModel(base, {"peft_type": "ADALORA", "init_r": 4})  # type: ignore[arg-type]


@case("inject-rank-pattern-above-rank")
def _inject_rank_pattern(env: Env) -> Callable[[], object]:
    base = env.bert()
    return lambda: inject_adapters(base, ["query"], rank=4, rank_pattern={"query": 6})


@case("inject-grouped-conv")
def _inject_grouped_conv(env: Env) -> Callable[[], object]:
    torch.manual_seed(0)
    net = env.watch(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)))
    return lambda: inject_adapters(net, r"\d", rank=2)


# -- rank allocation ------------------------------------------------------------------------------
@case("total-step-missing")
def _total_step_missing(env: Env) -> Callable[[], object]:
    model = env.model(total_step=None)
    env.rel.backward(model, 1)
    return lambda: model.update_and_allocate(1)


@case("step-repeated")
def _step_repeated(env: Env) -> Callable[[], object]:
    model = env.model(steps=3)
    env.rel.backward(model, 4)
    return lambda: model.update_and_allocate(3)


@case("step-backwards")
def _step_backwards(env: Env) -> Callable[[], object]:
    model = env.model(steps=3)
    env.rel.backward(model, 4)
    return lambda: model.update_and_allocate(2)


@case("step-not-an-integer")
def _step_not_integer(env: Env) -> Callable[[], object]:
    model = env.model(steps=3)
    env.rel.backward(model, 4)
    return lambda: model.update_and_allocate(4.5)  # type: ignore[arg-type]


@case("allocate-before-backward")
def _before_backward(env: Env) -> Callable[[], object]:
    model = env.model()
    return lambda: model.update_and_allocate(1)


@case("allocate-after-zero-grad")
def _after_zero_grad(env: Env) -> Callable[[], object]:
    model = env.model(steps=3)
    env.rel.backward(model, 4)
    model.zero_grad()
    return lambda: model.update_and_allocate(4)


@case("allocate-without-trainable-adapter")
def _no_trainable(env: Env) -> Callable[[], object]:
    model = env.watch(AdaLoraModel.from_pretrained(env.rel.tiny_bert(), env.adapter()))
    return lambda: model.update_and_allocate(1)


@case("set-total-step-too-small")
def _set_total_step(env: Env) -> Callable[[], object]:
    model = env.model(total_step=None)
    return lambda: model.set_total_step(4)


# -- loading an adapter ---------------------------------------------------------------------------
def _load(env: Env, path: Path, **kw: Any) -> Callable[[], object]:
    base = env.bert()
    return lambda: AdaLoraModel.from_pretrained(base, path, **kw)


@case("load-missing-directory")
def _load_missing(env: Env) -> Callable[[], object]:
    return _load(env, env.tmp / "nope")


@case("load-model-directory")
def _load_model_dir(env: Env) -> Callable[[], object]:
    env.rel.tiny_bert().save_pretrained(env.tmp / "bert")
    return _load(env, env.tmp / "bert")


@case("load-empty-directory")
def _load_empty(env: Env) -> Callable[[], object]:
    (env.tmp / "empty").mkdir()
    return _load(env, env.tmp / "empty")


@case("load-file-path")
def _load_file(env: Env) -> Callable[[], object]:
    return _load(env, env.adapter() / WEIGHTS)


@case("config-file-invalid-json")
def _config_invalid_json(env: Env) -> Callable[[], object]:
    path = env.adapter()
    text = (path / CONFIG).read_text()
    (path / CONFIG).write_text(text[: len(text) // 2])  # truncated
    return _load(env, path)


@case("config-file-not-an-object")
def _config_not_object(env: Env) -> Callable[[], object]:
    path = env.adapter()
    (path / CONFIG).write_text("[1, 2]")
    return _load(env, path)


@case("config-file-peft-type-lora")
def _config_lora(env: Env) -> Callable[[], object]:
    path = env.adapter()
    env.edit_config(path, lambda d: d.update(peft_type="LORA"))
    return _load(env, path)


@case("config-file-invalid-value")
def _config_invalid_value(env: Env) -> Callable[[], object]:
    path = env.adapter()
    env.edit_config(path, lambda d: d.update(target_r=8))
    return _load(env, path)


@case("config-file-peft-feature")
def _config_dora(env: Env) -> Callable[[], object]:
    path = env.adapter()
    env.edit_config(path, lambda d: d.update(use_dora=True))
    return _load(env, path)


@case("weights-missing")
def _weights_missing(env: Env) -> Callable[[], object]:
    path = env.adapter()
    (path / WEIGHTS).unlink()
    return _load(env, path)


@case("weights-bin-not-tensors")
def _weights_bin_not_tensors(env: Env) -> Callable[[], object]:
    path = env.adapter()
    (path / WEIGHTS).rename(path / "adapter_model.bin")
    return _load(env, path)


@case("weights-truncated")
def _weights_truncated(env: Env) -> Callable[[], object]:
    path = env.adapter()
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    return _load(env, path)


@case("weights-corrupted-header")
def _weights_corrupted(env: Env) -> Callable[[], object]:
    path = env.adapter()
    data = bytearray((path / WEIGHTS).read_bytes())
    data[8:16] = b"\xff" * 8  # the start of the JSON header
    (path / WEIGHTS).write_bytes(bytes(data))
    return _load(env, path)


@case("weights-missing-keys")
def _weights_missing_keys(env: Env) -> Callable[[], object]:
    path = env.adapter()
    env.edit_weights(path, lambda t: t.pop(f"{PREFIX}1.attention.self.value.lora_B"))
    return _load(env, path)


@case("weights-extra-keys")
def _weights_extra_keys(env: Env) -> Callable[[], object]:
    path = env.adapter()
    extra = f"{PREFIX}0.attention.self.key.lora_A"
    env.edit_weights(path, lambda t: t.update({extra: torch.zeros(2, 16)}))
    return _load(env, path)


@case("weights-keys-without-prefix")
def _weights_unprefixed(env: Env) -> Callable[[], object]:
    path = env.adapter()

    def strip(t: dict[str, torch.Tensor]) -> None:
        for key in list(t):
            if key.startswith(PREFIX + "1."):
                t[key.removeprefix("base_model.model.")] = t.pop(key)

    env.edit_weights(path, strip)
    return _load(env, path)


@case("weights-wrong-shape")
def _weights_wrong_shape(env: Env) -> Callable[[], object]:
    path = env.adapter()
    key = f"{PREFIX}0.attention.self.query.lora_B"
    env.edit_weights(path, lambda t: t.update({key: torch.zeros(16, 3)}))
    return _load(env, path)


@case("weights-integer-dtype")
def _weights_integer(env: Env) -> Callable[[], object]:
    path = env.adapter()
    key = f"{PREFIX}0.attention.self.query.lora_E"
    env.edit_weights(path, lambda t: t.update({key: t[key].to(torch.int64)}))
    return _load(env, path)


@case("weights-nan")
def _weights_nan(env: Env) -> Callable[[], object]:
    path = env.adapter()
    key = f"{PREFIX}1.attention.self.query.lora_A"
    env.edit_weights(path, lambda t: t[key].view(-1)[3].fill_(float("nan")))
    return _load(env, path)


@case("adapter-for-another-architecture")
def _other_architecture(env: Env) -> Callable[[], object]:
    return _load(env, env.adapter("gpt2"))


@case("adapter-for-another-model-size")
def _other_size(env: Env) -> Callable[[], object]:
    return _load(env, env.adapter("wide"))


@case("rank-pattern-wrong-length")
def _pattern_length(env: Env) -> Callable[[], object]:
    path = env.adapter()
    key = f"{Q0}.lora_E"
    env.edit_config(path, lambda d: d["rank_pattern"].update({key: [True] * 5}), unstamp=True)
    return _load(env, path)


@case("rank-pattern-unknown-module")
def _pattern_unknown(env: Env) -> Callable[[], object]:
    path = env.adapter()
    key = "bert.encoder.layer.0.attention.self.key.lora_E"
    env.edit_config(path, lambda d: d["rank_pattern"].update({key: [True] * 4}), unstamp=True)
    return _load(env, path)


@case("rank-pattern-malformed-key")
def _pattern_key(env: Env) -> Callable[[], object]:
    path = env.adapter()

    def rename(d: dict) -> None:
        d["rank_pattern"][Q0] = d["rank_pattern"].pop(f"{Q0}.lora_E")

    env.edit_config(path, rename, unstamp=True)
    return _load(env, path)


@case("rank-pattern-does-not-match-tensors")
def _pattern_tensors(env: Env) -> Callable[[], object]:
    path = env.adapter()

    def one_more(d: dict) -> None:  # the tensors keep sum(mask) triplets, the pattern one more
        mask = next(m for m in d["rank_pattern"].values() if not all(m))
        mask[mask.index(False)] = True

    env.edit_config(path, one_more, unstamp=True)
    return _load(env, path)


@case("files-from-two-saves")
def _two_saves(env: Env) -> Callable[[], object]:
    path = env.adapter("mid")
    shutil.copy(env.adapters["final"] / CONFIG, path / CONFIG)
    return _load(env, path)


@case("adapter-name-path")
def _adapter_name_path(env: Env) -> Callable[[], object]:
    model = env.watch(AdaLoraModel.from_pretrained(env.rel.tiny_bert(), env.adapter()))
    path = env.adapter("mid")
    return lambda: model.load_adapter(path, "../elsewhere")


@case("load-trainable-below-target-budget")
def _load_below_budget(env: Env) -> Callable[[], object]:
    path = env.adapter()
    env.edit_config(path, lambda d: d.update(target_r=3))  # the pattern keeps 2 per matrix
    return _load(env, path, is_trainable=True)


# -- allocator state (checkpoints) ---------------------------------------------------------------
def _allocator_state(env: Env, name: str, steps: int = 4, **overrides: Any) -> Path:
    model = AdaLoraModel(env.rel.tiny_bert(), env.config(**overrides))
    env.rel.train_steps(model, range(1, steps + 1))
    model.save_allocator_state(env.tmp / name)
    return env.tmp / name


@case("allocator-state-partial")
def _state_partial(env: Env) -> Callable[[], object]:
    path = _allocator_state(env, "ckpt")
    (path / "adalora_allocator.safetensors").unlink()
    model = env.model()
    return lambda: model.load_allocator_state(path)


@case("allocator-state-two-saves")
def _state_two_saves(env: Env) -> Callable[[], object]:
    path, later = _allocator_state(env, "ckpt"), _allocator_state(env, "later", steps=5)
    shutil.copy(later / "adalora_allocator.json", path / "adalora_allocator.json")
    model = env.model()
    return lambda: model.load_allocator_state(path)


@case("allocator-state-corrupt-json")
def _state_json(env: Env) -> Callable[[], object]:
    path = _allocator_state(env, "ckpt")
    (path / "adalora_allocator.json").write_text('{"format": ')
    model = env.model()
    return lambda: model.load_allocator_state(path)


@case("allocator-state-nan-ema")
def _state_nan_ema(env: Env) -> Callable[[], object]:
    path = _allocator_state(env, "ckpt")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in tensors if "ema_uncertainty" in k)
        tensors[key].view(-1)[0] = float("nan")

    env.edit_weights(path, poison, name="adalora_allocator.safetensors")
    model = env.model()
    return lambda: model.load_allocator_state(path)


@case("allocator-state-other-modules")
def _state_other_modules(env: Env) -> Callable[[], object]:
    path = _allocator_state(env, "ckpt", target_modules=["query"])
    model = env.model()
    return lambda: model.load_allocator_state(path)


@case("allocator-state-other-settings")
def _state_other_settings(env: Env) -> Callable[[], object]:
    path = _allocator_state(env, "ckpt", deltaT=2)
    model = env.model()
    return lambda: model.load_allocator_state(path)


# -- saving ----------------------------------------------------------------------------------------
@case("save-unknown-selected-adapter")
def _save_unknown(env: Env) -> Callable[[], object]:
    model = env.model()
    return lambda: model.save_pretrained(env.tmp / "out", selected_adapters=["nope"])


@case("save-into-a-file")
def _save_file(env: Env) -> Callable[[], object]:
    model = env.model()
    (env.tmp / "file").write_text("not a directory")
    return lambda: model.save_pretrained(env.tmp / "file")


@case("config-save-into-a-file")
def _config_save_file(env: Env) -> Callable[[], object]:
    (env.tmp / "file").write_text("not a directory")
    config = env.config()
    return lambda: config.save_pretrained(env.tmp / "file")


# -- the harness ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, rel: SimpleNamespace) -> dict[str, Path]:
    """Adapters saved once for the module: ``final`` (after the final allocation, shrunk),
    ``mid`` (during budgeting), ``gpt2`` (another architecture), ``wide`` (hidden size 24)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("adapters")
    model = AdaLoraModel(rel.tiny_bert(), AdaLoraConfig(**rel.schedule()))
    optimizer = rel.train_steps(model, range(1, 6))
    model.save_pretrained(root / "mid")
    rel.train_steps(model, range(6, 13), optimizer)
    model.save_pretrained(root / "final")
    wide = AdaLoraModel(rel.tiny_bert(hidden=24), AdaLoraConfig(**rel.schedule()))
    wide.save_pretrained(root / "wide")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    AdaLoraModel(gpt2, AdaLoraConfig(init_r=4, target_r=2, total_step=10)).save_pretrained(
        root / "gpt2"
    )
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_fails_clearly_and_changes_nothing(
    row: Row, rel: SimpleNamespace, adapters: dict[str, Path], tmp_path: Path
) -> None:
    env = Env(tmp_path, rel, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set-up noise (e.g. transformers' save warnings)
        call = CASES[row.id](env)
    models = [rel.tensors_of(m) for m in env.watched]
    files = rel.files_of(tmp_path)
    with pytest.raises(Exception) as info:  # the type is checked exactly below
        call()
    assert type(info.value).__name__ == row.error, f"{type(info.value).__name__}: {info.value}"
    assert row.message in str(info.value)
    for model, before in zip(env.watched, models):
        rel.assert_same_tensors(before, rel.tensors_of(model))
    assert rel.files_of(tmp_path) == files, "a file changed or appeared"


def test_the_table_in_docs_lists_every_case() -> None:
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "a case id appears twice in docs/errors.md"
    assert set(ids) == set(CASES), (
        f"only in docs/errors.md: {sorted(set(ids) - set(CASES))}; "
        f"only in this file: {sorted(set(CASES) - set(ids))}"
    )
    assert len(ids) >= 30
    assert all(
        r.error in {"ValueError", "TypeError", "FileNotFoundError", "NotImplementedError"}
        for r in ROWS
    )
