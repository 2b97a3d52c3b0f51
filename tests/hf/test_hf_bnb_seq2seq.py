"""The path of PEFT's AdaLoRA example (Whisper in int8 with ``Seq2SeqTrainer``), on a tiny
Whisper loaded in 8-bit on the CPU: k-bit preparation, training with ``AdaLoraCallback``,
checkpoints that PEFT loads onto the same 8-bit base, and reloading the best checkpoint under
the adapter's own name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BitsAndBytesConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from adalora_hf import (  # noqa: E402
    AdaLoraCallback,
    AdaLoraConfig,
    AdaLoraModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from adalora_torch import SVDLinear8bitLt  # noqa: E402

STEPS = 8
MELS, FRAMES, VOCAB = 8, 32, 99
# PEFT's Whisper example adapts these
TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MELS, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=FRAMES // 2, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper")
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    return path


def _load(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WhisperForConditionalGeneration.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32
        )


def _example(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "input_features": torch.randn(MELS, FRAMES, generator=g),
        "labels": torch.randint(3, VOCAB, (6,), generator=g),
    }


def _logits(model: nn.Module) -> torch.Tensor:
    batch = {k: v[None] for k, v in _example(99).items()}
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_seq2seq_trainer_on_an_8bit_whisper_as_in_peft_s_example(saved, tmp_path) -> None:
    base = prepare_model_for_kbit_training(_load(saved))
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=TARGETS
    )
    model = get_peft_model(base, config)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        load_best_model_at_end=True, disable_tqdm=True,
    )  # fmt: skip
    data = [_example(i) for i in range(16)]
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:4],
        callbacks=[AdaLoraCallback()],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ours = model.base_model
    assert isinstance(base.model.encoder.layers[0].self_attn.q_proj, SVDLinear8bitLt)
    assert "eval_loss" in trainer.evaluate()
    # load_best_model_at_end restored the best checkpoint's adapter and allocator state
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-4"  # so the reload below changes the adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_best = AdaLoraModel.from_pretrained(_load(saved), best)
    assert ours.total_rank() == from_best.total_rank()
    torch.testing.assert_close(_logits(model), _logits(from_best), rtol=1e-5, atol=1e-5)

    # the last checkpoint, reloaded under the adapter's own name as PEFT's example does, and
    # loaded by PEFT onto the same 8-bit base: the same outputs
    last = tmp_path / f"checkpoint-{STEPS}"
    ours.load_adapter(last, "default")
    expected = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_load(saved), str(last))
    torch.testing.assert_close(_logits(theirs), expected, rtol=1e-5, atol=1e-5)
