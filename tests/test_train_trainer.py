"""The training loop: exact resume, schedules, eval/metrics/plot outputs, divergence handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.errors import ConfigError, HoldallError
from holdall.training.data import build_datasets
from holdall.training.qlora import prepare_model
from holdall.training.trainer import Trainer, TrainerConfig, TrainingDivergedError, lr_lambda
from holdall.tuners.lora import LoraConfig

RECORDS = [
    {"prompt": "the quick brown fox", "response": "jumps over a lazy dog"},
    {"prompt": "three customers each want", "response": "their own model"},
    {"instruction": "quantization packs weights", "input": "into fewer bits", "output": "and adapters tailor behaviour"},
    {"messages": [{"role": "user", "content": "a lazy dog"}, {"role": "assistant", "content": "the quick brown fox"}]},
] * 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def _trainer(data_file, out, method="qlora", optimizer="adamw8bit", **overrides):
    torch.manual_seed(0)
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(hidden=32, layers=1, intermediate=64)  # small: the loop, not the model, is under test
    prepare_model(model, method, LoraConfig(r=4, alpha=8, dropout=0.1), gradient_checkpointing=True)
    data = build_datasets(data_file, tok, max_len=32, eval_fraction=0.25, seed=0)
    settings = dict(lr=5e-3, max_steps=6, batch_size=2, grad_accum=2, warmup=2, optimizer=optimizer,
                    eval_every=2, save_every=3, progress=False)
    settings.update(overrides)
    return Trainer(model, data.train, data.eval, TrainerConfig(**settings), out, pad_id=tok.eos_token_id)


def _losses(result_or_trainer):
    return [h["loss"] for h in result_or_trainer.history if "loss" in h]


def test_resume_continues_the_same_loss_curve_exactly(data_file, tmp_path):
    optimizer = "adamw8bit"  # the hardest state to restore: uint8 codes + absmax (torch's AdamW is plain floats)
    straight = _trainer(data_file, tmp_path / "a", optimizer=optimizer).train()
    # the same run, interrupted right after its step-3 checkpoint (save_every=3)
    first = _trainer(data_file, tmp_path / "b", optimizer=optimizer)
    save = first.save_checkpoint

    def save_then_crash():
        save()
        raise KeyboardInterrupt

    first.save_checkpoint = save_then_crash
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert first.step == 3
    first_losses = _losses(first)
    resumed = _trainer(data_file, tmp_path / "b", optimizer=optimizer).train(resume=True)
    assert resumed.steps == 6
    assert first_losses == _losses(straight)[:3]
    assert _losses(resumed) == _losses(straight)  # history restored + the same 3 new steps, bit for bit
    assert resumed.eval_loss == straight.eval_loss
    # the metrics log of the resumed run equals the uninterrupted one (tokens/s aside)
    def strip(path):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in path.read_text().splitlines()]
    assert strip(resumed.metrics_path) == strip(straight.metrics_path)


def test_outputs_metrics_plot_and_checkpoint(data_file, tmp_path):
    result = _trainer(data_file, tmp_path / "run", method="lora", optimizer="adamw").train()
    lines = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 and math.isfinite(r["grad_norm"]) for r in steps)
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = result.checkpoint_path
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "trainer_state.pt", "trainer_state.json"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    assert _losses(result)[-1] < _losses(result)[0]


def test_lr_schedule_warmup_then_decay():
    cos = lr_lambda(total_steps=10, warmup_steps=2, schedule="cosine")
    assert [round(cos(s), 3) for s in (0, 1)] == [0.333, 0.667]
    assert cos(2) == 1.0 and cos(10) == pytest.approx(0.0) and 0 < cos(6) < 1
    lin = lr_lambda(10, 0, "linear")
    assert lin(0) == 1.0 and lin(5) == 0.5
    assert lr_lambda(10, 0, "constant")(9) == 1.0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data_file, tmp_path):
    trainer = _trainer(data_file, tmp_path / "nan", optimizer="adamw", save_every=2)
    original = trainer._train_step

    def poison():
        if trainer.step == 3:  # the 4th step's forward produces NaN
            for p in trainer.params:
                p.data.fill_(float("nan"))
        return original()

    trainer._train_step = poison
    with pytest.raises(TrainingDivergedError, match=r"step 4.*lower the learning rate") as info:
        trainer.train()
    assert isinstance(info.value, HoldallError)
    assert "last good checkpoint" in str(info.value)
    state = json.loads((tmp_path / "nan" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_resume_without_checkpoint_or_with_other_settings_is_refused(data_file, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        _trainer(data_file, tmp_path / "none").train(resume=True)
    _trainer(data_file, tmp_path / "x", max_steps=2).train()
    with pytest.raises(ConfigError, match="same data"):
        _trainer(data_file, tmp_path / "x", max_steps=4).train(resume=True)


def test_config_validation():
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainerConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="schedule"):
        TrainerConfig(schedule="step")
    with pytest.raises(ConfigError, match="lr"):
        TrainerConfig(lr=0)
