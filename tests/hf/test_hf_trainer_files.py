"""transformers.Trainer as PEFT users run it: eval_loss with default arguments, checkpoints that
hold PEFT's adapter files (loadable by peft.PeftModel.from_pretrained and by ours, tied
embeddings included), load_best_model_at_end, with and without peft installed."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from adalora_hf import AdaLoraCallback, AdaLoraConfig, AdaLoraModel, get_peft_model

from .conftest import TINY

peft = pytest.importorskip("peft")


def _data(kind: str, n: int = 16) -> list[dict]:
    return [{k: v[0] for k, v in TINY[kind].batch(i).items()} for i in range(n)]


def _args(tmp_path, cls=TrainingArguments, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return cls(**kw)


def _config(kind: str) -> AdaLoraConfig:
    return AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, task_type=TINY[kind].task_type,
        init_lora_weights=False,
    )  # fmt: skip


def _train(trainer: Trainer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    inputs = dict(batch)
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["labels"]
    inputs.pop("labels")  # PEFT's frozen AdaLoRA model fails on a loss (no trainable adapter)
    with torch.no_grad():
        return model(**inputs).logits


def test_evaluate_reports_eval_loss_with_default_arguments(make_base, tmp_path) -> None:
    model = get_peft_model(make_base("bert"), _config("bert"))
    args = _args(tmp_path, save_strategy="no")
    trainer = Trainer(model=model, args=args, eval_dataset=_data("bert"))
    assert trainer.label_names == ["labels"]  # found on our class, as on the wrapped model
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_checkpoints_hold_peft_files_on_tied_models(make_base, tmp_path, kind) -> None:
    # GPT-2 and T5 tie their input and output embeddings
    model = get_peft_model(make_base(kind), _config(kind))
    cls, args_cls = (
        (Seq2SeqTrainer, Seq2SeqTrainingArguments) if kind == "t5" else (Trainer, TrainingArguments)
    )
    trainer = cls(
        model=model, args=_args(tmp_path, args_cls), train_dataset=_data(kind),
        callbacks=[AdaLoraCallback()],
    )  # fmt: skip
    _train(trainer)
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file()
    peft_file = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in peft_file)
    # the Trainer's own file (for resume / best model) holds the adapter only
    trainer_file = load_file(str(checkpoint / "model.safetensors"))
    assert not any("shared" in k or "wte" in k or "lm_head" in k for k in trainer_file)

    batch = TINY[kind].batch(99)
    expected = _logits(model, batch)
    theirs = peft.PeftModel.from_pretrained(make_base(kind), str(checkpoint))
    ours = AdaLoraModel.from_pretrained(make_base(kind), checkpoint)
    torch.testing.assert_close(_logits(theirs, batch), expected)
    torch.testing.assert_close(_logits(ours, batch), expected)


class _LossAt(TrainerCallback):
    """Records the eval loss of each evaluation step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.losses[state.global_step] = metrics["eval_loss"]


def test_load_best_model_at_end_restores_the_best_adapter(make_base, tmp_path) -> None:
    model = get_peft_model(make_base("bert"), _config("bert"))
    recorder = _LossAt()
    args = _args(
        tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, learning_rate=0.3,
        load_best_model_at_end=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_data("bert"), eval_dataset=_data("bert", 8),
        callbacks=[AdaLoraCallback(), recorder],
    )  # fmt: skip
    _train(trainer)
    best = min(recorder.losses, key=recorder.losses.__getitem__)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    saved = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    params = dict(model.named_parameters())
    for key, value in saved.items():
        if key in params:
            torch.testing.assert_close(params[key].detach(), value, msg=key)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(recorder.losses[best], rel=1e-5)
    # the rank pattern is the best checkpoint's too, so the saved adapter is those weights
    saved_config = json.loads((tmp_path / f"checkpoint-{best}" / "adapter_config.json").read_text())
    pattern = model.base_model.peft_config["default"].rank_pattern
    expected = saved_config["rank_pattern"]
    assert (pattern and {k.removesuffix(".default"): v for k, v in pattern.items()}) == expected
    model.save_pretrained(tmp_path / "final")
    reloaded = AdaLoraModel.from_pretrained(make_base("bert"), tmp_path / "final")
    batch = TINY["bert"].batch(3)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch))


def test_trainer_without_peft_installed(make_base, tmp_path, monkeypatch) -> None:
    # Trainer asks transformers.utils.is_peft_available (imported by name into
    # transformers.trainer and, in 5.x, transformers.trainer_utils) whether to look for
    # peft.PeftModel: make those answer False, and make any `import peft` fail
    for module in (transformers.trainer, transformers.trainer_utils):
        monkeypatch.setattr(module, "is_peft_available", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "peft", None)
    model = get_peft_model(make_base("gpt2"), _config("gpt2"))
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=_data("gpt2"),
        eval_dataset=_data("gpt2", 4), callbacks=[AdaLoraCallback()],
    )  # fmt: skip
    _train(trainer)
    assert "eval_loss" in trainer.evaluate()
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    ours = AdaLoraModel.from_pretrained(make_base("gpt2"), tmp_path / "checkpoint-4")
    batch = TINY["gpt2"].batch(5)
    torch.testing.assert_close(_logits(ours, batch), _logits(model, batch))


class _PeftsOptimizerStepCallback(TrainerCallback):
    """The hand-written callback of PEFT's AdaLoRA documentation, in our words."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def test_pefts_documented_callback_survives_checkpoints(make_base, tmp_path) -> None:
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4, task_type="SEQ_CLS"
    )
    model = get_peft_model(make_base("bert"), config)
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=_data("bert"),
        callbacks=[_PeftsOptimizerStepCallback()],
    )  # fmt: skip
    _train(trainer)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    assert model.base_model.rankallocator.step == 3  # steps 0..3, as PEFT's callback counts
