"""The holdall command, driven in-process: real work on tiny models, and clear errors on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from holdall.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_info_eval_round_trip(capsys, tmp_path, tiny_llama_dir, tiny_text_file):
    out_dir = tmp_path / "q"
    code, out, err = run(capsys, "quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "4",
                         "--group-size", "32", "-o", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (out_dir / "holdall_quant.json").exists()
    assert "quant" in json.dumps(summary).lower()

    code, out, err = run(capsys, "eval", str(out_dir), "--text", str(tiny_text_file), "--seq-len", "64",
                         "--kld-vs", str(tiny_llama_dir), "--json")
    assert code == 0, err
    record = json.loads(out)
    assert math.isfinite(record["ppl"]) and record["ppl"] > 1
    assert record["kld_mean"] > 0  # 4-bit rounding changes the distribution, if only a little
    assert record["n_windows"] == record["n_tokens"] // 63 or record["n_windows"] > 0

    # the same model against itself has zero divergence
    code, out, err = run(capsys, "eval", str(tiny_llama_dir), "--text", str(tiny_text_file), "--seq-len", "64",
                         "--kld-vs", str(tiny_llama_dir), "--json", "--max-windows", "2")
    assert code == 0, err
    same = json.loads(out)
    assert same["n_windows"] == 2
    assert abs(same["kld_mean"]) < 1e-6


def test_existing_output_is_refused_without_force(capsys, tmp_path, tiny_llama_dir):
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(out_dir))
    assert code == 2
    assert "already exists" in err and "--force" in err


def test_missing_model_path_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path / "no-such-model"))
    assert code == 2
    assert "no-such-model" in err


@pytest.mark.parametrize("argv, needle", [
    (["--method", "rtn", "--bits", "7"], "bits"),
    (["--method", "nf4", "--bits", "3"], "nf4"),
    (["--method", "rtn", "--group-size", "0"], "group"),
])
def test_bad_quantization_options(capsys, tmp_path, tiny_llama_dir, argv, needle):
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), *argv, "-o", str(tmp_path / "o"))
    assert code == 2
    assert needle in err.lower()
    assert not (tmp_path / "o").exists()


def test_truncated_weights_are_reported(capsys, tmp_path, tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "info", str(tiny_llama_dir))
    assert code == 2
    assert "model.safetensors" in err


def test_convert_writes_a_directory_transformers_loads(capsys, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "hf"
    code, _, err = run(capsys, "convert", str(tiny_llama_dir), "-o", str(out_dir))
    assert code == 0, err
    a = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    b = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_plan_preset_text_and_json(capsys):
    code, out, err = run(capsys, "plan", "llama-2-7b")
    assert code == 0, err
    assert "QLoRA" in out and "LoRA" in out
    code, out, err = run(capsys, "plan", "llama-2-7b", "--json", "--gpu", "80GB")
    assert code == 0, err
    json.loads(out)


def test_plan_unknown_model_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "plan", str(tmp_path / "nothing-here"))
    assert code == 2
    assert "nothing-here" in err


def test_plan_bad_gpu_size(capsys):
    code, _, err = run(capsys, "plan", "llama-2-7b", "--gpu", "lots")
    assert code == 2
    assert "80GB" in err


def _tiny_jsonl(path, n=24):
    import random

    from conftest import WORDS

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(5))
        lines.append(json.dumps({"instruction": prompt, "output": "the quick brown fox"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_then_merge(capsys, tmp_path, tiny_llama_dir, method):
    from transformers import AutoModelForCausalLM

    from holdall.models.loading import load_model
    from holdall.tuners.lora import load_adapter

    data = _tiny_jsonl(tmp_path / "train.jsonl")
    adapter = tmp_path / "adapter"
    code, out, err = run(capsys, "finetune", str(tiny_llama_dir), "--data", str(data), "-o", str(adapter),
                         "--method", method, "-r", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "6",
                         "--max-len", "32", "--eval-fraction", "0.25", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"] == 6
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "metrics.jsonl").exists()

    merged = tmp_path / "merged"
    code, _, err = run(capsys, "merge", str(tiny_llama_dir), str(adapter), "-o", str(merged))
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    base, _ = load_model(tiny_llama_dir)
    load_adapter(base, adapter)
    with torch.no_grad():
        expected = base(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter learned something


def test_merge_refuses_a_quantized_base(capsys, tmp_path, tiny_llama_dir):
    data = _tiny_jsonl(tmp_path / "train.jsonl", n=8)
    adapter = tmp_path / "adapter"
    code, _, err = run(capsys, "finetune", str(tiny_llama_dir), "--data", str(data), "-o", str(adapter),
                       "--method", "lora", "--max-steps", "1", "--max-len", "32", "--json")
    assert code == 0, err
    quant = tmp_path / "q"
    assert run(capsys, "quantize", str(tiny_llama_dir), "--group-size", "32", "-o", str(quant))[0] == 0
    code, _, err = run(capsys, "merge", str(quant), str(adapter), "-o", str(tmp_path / "m"))
    assert code == 2
    assert "full precision" in err


def test_finetune_bad_data_is_a_clear_error(capsys, tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{not json\n')
    code, _, err = run(capsys, "finetune", str(tiny_llama_dir), "--data", str(bad), "-o", str(tmp_path / "a"))
    assert code == 2
    assert "line 2" in err
