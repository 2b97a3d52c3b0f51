"""AdaLoraCallback in transformers.Trainer: total_step from max_steps, one allocation per
optimizer step under gradient accumulation, exactly the target budget at the end, logs."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from adalora_hf import AdaLoraCallback, AdaLoraConfig, AdaLoraModel, get_peft_model
from adalora_torch import SVDAdapter

MAX_STEPS = 8
ACCUMULATION = 2


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 99, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


def _trainer(model, tmp_path, callbacks) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=MAX_STEPS,
        gradient_accumulation_steps=ACCUMULATION,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)


def _kept_per_layer(model: AdaLoraModel) -> list[int]:
    return [
        int(torch.count_nonzero(m.lora_E["default"]))
        for m in model.model.modules()
        if isinstance(m, SVDAdapter)
    ]


def _config() -> AdaLoraConfig:
    """A short schedule with total_step left to the callback, E drawn non-zero."""
    return AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=2,
        deltaT=1,
        task_type="SEQ_CLS",
        init_lora_weights=False,
    )


@pytest.mark.parametrize("wrap", ["AdaLoraModel", "get_peft_model"])
def test_trainer_with_callback_ends_at_the_target_budget(make_base, tmp_path, wrap) -> None:
    config = _config()
    assert config.total_step is None
    if wrap == "AdaLoraModel":
        model = AdaLoraModel(make_base("bert"), config)
    else:
        model = get_peft_model(make_base("bert"), config)
    adalora = model.base_model
    trainer = _trainer(model, tmp_path, [AdaLoraCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    assert adalora.peft_config["default"].total_step == MAX_STEPS  # from max_steps
    allocator = adalora.rankallocator
    assert allocator is not None and allocator.finalized
    assert allocator.step == MAX_STEPS  # steps 1..max_steps, once per optimizer step
    assert adalora._plain_lora.allocations == MAX_STEPS
    n_matrices = len(_kept_per_layer(adalora))
    target = 2 * n_matrices
    assert sum(_kept_per_layer(adalora)) == target == adalora.total_rank()
    assert sum(sum(m) for m in adalora.rank_pattern.values()) == target
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == MAX_STEPS and all("adalora_total_rank" in h for h in logged)
    assert logged[0]["adalora_budget"] == 4 * n_matrices  # step 1 = tinit: warm-up
    assert logged[-1]["adalora_total_rank"] == logged[-1]["adalora_budget"] == target


def test_trainer_without_callback_warns_plain_lora(make_base, tmp_path) -> None:
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=MAX_STEPS, task_type="SEQ_CLS")
    model = get_peft_model(make_base("bert"), config)
    trainer = _trainer(model, tmp_path, [])
    with pytest.warns(UserWarning, match="acting as plain LoRA") as record:
        trainer.train()
    assert sum("plain LoRA" in str(w.message) for w in record) == 1
    assert model.base_model.rank_pattern is None


def test_callback_rejects_a_model_without_adalora(make_base) -> None:
    with pytest.raises(ValueError, match="found no AdaLoraModel"):
        AdaLoraCallback().on_optimizer_step(None, None, None, model=make_base("bert"))


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _checkpointing_trainer(model, out, callbacks) -> Trainer:
    trainer = _trainer(model, out, callbacks)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 4
    return trainer


def _adalora_bert(make_base) -> AdaLoraModel:
    return get_peft_model(make_base("bert"), _config())


def test_resumed_run_allocates_as_an_uninterrupted_one(make_base, tmp_path) -> None:
    whole = _adalora_bert(make_base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _checkpointing_trainer(whole, tmp_path / "whole", [AdaLoraCallback()]).train()

        first = _adalora_bert(make_base)
        _checkpointing_trainer(first, tmp_path / "split", [AdaLoraCallback(), _StopAt(4)]).train()
        assert first.base_model.rankallocator.step == 4
        checkpoint = tmp_path / "split" / "checkpoint-4"
        # the checkpoint holds the adapter (small, PEFT-like) and the allocator state
        saved = load_file(str(checkpoint / "model.safetensors"))
        adapter_parts = (".lora_", ".ranknum.", ".modules_to_save.")
        assert saved and all(any(p in k for p in adapter_parts) for k in saved)
        assert (checkpoint / "adalora_allocator.json").is_file()

        second = _adalora_bert(make_base)
        trainer = _checkpointing_trainer(second, tmp_path / "split", [AdaLoraCallback()])
        trainer.train(resume_from_checkpoint=str(checkpoint))

    assert second.base_model.rankallocator.step == MAX_STEPS
    assert second.base_model.rank_pattern == whole.base_model.rank_pattern
    expected = dict(whole.named_parameters())
    for name, param in second.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not second.base_model.adapter_only_state_dict  # full state dict outside the Trainer
    assert any("word_embeddings" in k for k in second.state_dict())


def test_checkpoints_of_a_tied_language_model(make_base, tmp_path) -> None:
    # GPT-2 ties lm_head to the input embeddings: a full state dict cannot go to safetensors
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, task_type="CAUSAL_LM")
    model = get_peft_model(make_base("gpt2"), config)
    data = [{"input_ids": torch.randint(1, 99, (8,)), "labels": torch.randint(1, 99, (8,))}] * 16
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert (tmp_path / "checkpoint-4" / "adalora_allocator.safetensors").is_file()
    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert not any("wte" in k or "lm_head" in k for k in saved)


def test_resume_without_allocator_state_warns(make_base, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _adalora_bert(make_base)
        _checkpointing_trainer(first, tmp_path, [AdaLoraCallback(), _StopAt(4)]).train()
    for name in ("adalora_allocator.json", "adalora_allocator.safetensors"):
        (tmp_path / "checkpoint-4" / name).unlink()
    second = _adalora_bert(make_base)
    trainer = _checkpointing_trainer(second, tmp_path, [AdaLoraCallback()])
    with pytest.warns(UserWarning, match="without the rank allocator's state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_checkpoint_window_opens_only_for_a_save(make_base, tmp_path) -> None:
    # a run that stops (exception, Ctrl-C) after a step must not leave state_dict() without
    # the base weights: the adapter-only window opens only when the Trainer will save now
    from transformers import TrainerControl, TrainerState

    model = _adalora_bert(make_base)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback, state = AdaLoraCallback(), TrainerState()
    callback.on_step_end(args, state, TrainerControl(should_save=False), model=model)
    assert not model.base_model.adapter_only_state_dict
    assert any("word_embeddings" in k for k in model.state_dict())
    callback.on_epoch_end(args, state, TrainerControl(should_save=True), model=model)
    assert model.base_model.adapter_only_state_dict
    callback.on_save(args, state, TrainerControl(), model=model)
    assert not model.base_model.adapter_only_state_dict
