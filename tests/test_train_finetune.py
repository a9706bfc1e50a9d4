"""finetune() end to end on a tiny model, the PEFT adapter it writes, and merge() at full precision."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.errors import ConfigError
from holdall.training import FinetuneConfig, finetune, merge

pytestmark = pytest.mark.usefixtures("one_thread")




def _config(**kw):
    base = dict(method="qlora", r=4, alpha=8, dropout=0.0, lr=3e-2, max_steps=12, batch_size=2, warmup=0,
                max_len=32, eval_fraction=0.25, eval_every=6, schedule="constant", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_qlora_finetune_lowers_the_loss_and_writes_a_peft_adapter(finetune_data_file, tmp_path):
    out = tmp_path / "adapter"
    model = make_tiny_llama()
    result = finetune(model, finetune_data_file, _config(optimizer="adamw8bit"), out, tokenizer=make_tiny_tokenizer())
    assert result.steps == 12
    history = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    # the tiny random model learns slowly but surely (batches differ, so compare averages of 3 steps)
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.15
    assert evals[-1] < evals[0]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "checkpoint"} <= names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert result.tokens_per_s > 0 and "trainable params" in result.trainable


def test_lora_finetune_then_merge_matches_the_adapted_model(finetune_data_file, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from holdall.tuners.lora import load_adapter

    out = tmp_path / "adapter"
    finetune(str(tiny_llama_dir), finetune_data_file, _config(method="lora", max_steps=4, eval_fraction=0.0), out)
    merged_dir = merge(str(tiny_llama_dir), out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    load_adapter(adapted, out)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        assert not torch.allclose(base(ids).logits, merged(ids).logits)  # training changed something


def test_merge_refuses_a_quantized_base(tmp_path, tiny_llama_dir):
    from holdall.algorithms import QuantConfig, quantize
    from holdall.models import load_model
    from holdall.models.checkpoint import save_quantized

    model, tok = load_model(str(tiny_llama_dir))
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    qdir = save_quantized(model, tok, tmp_path / "q")
    with pytest.raises(ConfigError, match="merge at full precision: pass the original float model"):
        merge(str(qdir), tmp_path / "adapter", tmp_path / "merged")


def test_finetune_config_validation():
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="full")
    with pytest.raises(ConfigError, match="optimizer"):
        FinetuneConfig(optimizer="sgd")
    with pytest.raises(ConfigError):
        FinetuneConfig(r=0)
    with pytest.raises(ConfigError, match="grad_accum"):
        FinetuneConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        finetune(make_tiny_llama(), "x.jsonl", FinetuneConfig(progress=False), "out")


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_fast_step_finetune_matches_the_standard_step(finetune_data_file, tmp_path, method):
    """finetune(fast_step=True): right-padded batches of 2, gradient accumulation, clipping — the same losses and
    the same adapter as the standard step (float32 on CPU, no dropout, so both compute the same function)."""
    from safetensors.torch import load_file

    results = {}
    for fast in (False, True):
        out = tmp_path / f"adapter-{fast}"
        config = _config(method=method, fast_step=fast, grad_accum=2, max_steps=4, eval_fraction=0.0,
                         eval_every=None, compute_dtype="float32", max_grad_norm=0.5)
        finetune(make_tiny_llama(), finetune_data_file, config, out, tokenizer=make_tiny_tokenizer())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[fast] = ([h["loss"] for h in history if "loss" in h], load_file(out / "adapter_model.safetensors"))
    (slow_losses, slow_adapter), (fast_losses, fast_adapter) = results[False], results[True]
    assert fast_losses == pytest.approx(slow_losses, rel=1e-4)
    assert slow_adapter.keys() == fast_adapter.keys()
    for key in slow_adapter:
        # Adam divides by sqrt(v): float-rounding differences in near-zero gradients move a few entries by ~1e-4
        torch.testing.assert_close(fast_adapter[key], slow_adapter[key], rtol=1e-3, atol=5e-4)


def test_fast_step_config_rules():
    with pytest.raises(ConfigError, match="fast_step"):
        FinetuneConfig(cuda_graphs=True)
    assert "fast_step" not in FinetuneConfig().to_dict()  # records of runs without it are unchanged
    assert FinetuneConfig(fast_step=True).to_dict()["fast_step"] is True
