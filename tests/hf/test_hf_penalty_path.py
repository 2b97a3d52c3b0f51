"""The orthogonal penalty on each path, as PEFT: ``get_peft_model`` adds it to the training loss
only with a ``task_type``; ``AdaLoraModel`` always adds it."""

from __future__ import annotations

import warnings

import pytest
import torch

from adalora_hf import AdaLoraConfig, get_peft_model
from adalora_torch import orthogonal_penalty


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_get_peft_model_adds_the_penalty_only_with_a_task_type(
    task_type, make_base, schedule, bert_batch
) -> None:
    kw = schedule(orth_reg_weight=0.3, task_type=task_type)
    model = get_peft_model(make_base("bert"), AdaLoraConfig(**kw)).train()
    plain = model.get_base_model()(**bert_batch).loss
    penalty = orthogonal_penalty(model.get_base_model(), adapter_name="default")
    assert penalty > 0
    expected = plain if task_type is None else plain + 0.3 * penalty
    torch.testing.assert_close(model(**bert_batch).loss, expected)
    # the AdaLoraModel underneath adds it on either path
    torch.testing.assert_close(model.base_model(**bert_batch).loss, plain + 0.3 * penalty)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_the_training_loss_matches_peft_on_each_path(
    task_type, make_base, schedule, bert_batch
) -> None:
    peft = pytest.importorskip("peft")
    kw = schedule(orth_reg_weight=0.3, task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_base("bert"), peft.AdaLoraConfig(**kw)).train()
    ours = get_peft_model(make_base("bert"), AdaLoraConfig(**kw)).train()
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(**bert_batch).loss, theirs(**bert_batch).loss)
