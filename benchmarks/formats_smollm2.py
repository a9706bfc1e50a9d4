"""Ecosystem checkpoints on a real model: SmolLM2-135M through GPTQ / AWQ / compressed-tensors and back, and an
llm-compressor checkpoint of it read by holdall.

1. holdall RTN int4 g64 symmetric (g64: 576 columns are whole groups) -> export to each format: bytes on disk,
   export and read-back time, codes identical after the round trip, perplexity identical; the compressed-tensors
   export is also loaded by transformers (+ compressed-tensors) and scored the same way.
2. llm-compressor's GPTQ (w4 g64, its defaults, calibration --calib-samples x --calib-len tokens of WikiText-2
   valid, default 8 x 256: the checkpoint's layout is the point here, not its quality) run in its own
   environment (``--lcvenv``, transformers 5.17) on the same float model; that environment also saves the logits
   transformers computes for the first test window. holdall reads the checkpoint (``holdall.load_model``) and its
   logits are compared with those, and its perplexity with transformers' (this environment) on the same windows.

Evaluation: the first ``--windows`` windows x 2048 tokens of WikiText-2 test (holdall.evaluate's protocol).

Usage: .venv/bin/python benchmarks/formats_smollm2.py [--lcvenv /work/lcvenv] [--windows 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

LC_SCRIPT = textwrap.dedent('''
    import json, random, sys, time, torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    src, out, valid, ids_path, n, length = sys.argv[1:7]
    n, length = int(n), int(length)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(open(valid).read()).input_ids
    random.seed(0)
    starts = [random.randrange(0, len(ids) - length) for _ in range(n)]
    data = Dataset.from_list([{"input_ids": ids[s:s + length], "attention_mask": [1] * length} for s in starts])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))
    t = time.time()
    oneshot(model=model, dataset=data, recipe=GPTQModifier(config_groups={"g0": scheme}, ignore=["lm_head"]),
            max_seq_length=length, num_calibration_samples=n)
    seconds = time.time() - t
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    test_ids = torch.load(ids_path, weights_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(test_ids).logits
    torch.save(logits, out + "/reference_logits.pt")
    json.dump({"gptq_seconds": seconds}, open(out + "/reference_run.json", "w"))
''')


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix == ".safetensors")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lcvenv", default="/work/lcvenv", help="venv with llmcompressor (skip step 2 if missing)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import holdall
    from holdall.algorithms import QuantConfig, quantize
    from holdall.core.linear import QuantLinear
    from holdall.evaluation.text import load_text
    from holdall.formats import export_checkpoint

    text = load_text(str(Path(holdall.__file__).parent / "data" / "wikitext-2" / "test.txt"))
    valid = Path(holdall.__file__).parent / "data" / "wikitext-2" / "valid.txt"
    results: dict = {"windows": args.windows, "seq_len": 2048,
                     "llmcompressor_calibration": f"{args.calib_samples} x {args.calib_len}"}
    work = Path(tempfile.mkdtemp(prefix="formats-smollm2-"))
    float_model, tok = holdall.load_model("smollm2")
    float_dir = holdall.save_hf(float_model, tok, work / "float")
    ids = tok(text, return_tensors="pt").input_ids[:, : args.windows * 2048]

    def ppl(model):
        return holdall.evaluate(model, tok, input_ids=ids[0], seq_len=2048, progress=False).ppl

    model = quantize(float_model, QuantConfig.for_method("rtn", bits=4, group_size=64), progress=False)
    results["holdall_rtn_w4g64_ppl"] = ppl(model)
    rows = []
    for fmt in ("holdall", "gptq", "awq", "compressed-tensors"):
        t = time.time()
        out = export_checkpoint(model, work / fmt, format=fmt, tokenizer=tok)
        export_s = time.time() - t
        t = time.time()
        back, _ = holdall.load_model(out)
        read_s = time.time() - t
        same = all(
            torch.equal(model.get_submodule(n)._buffers[b], back.get_submodule(n)._buffers[b])
            for n in model.holdall_quant["layers"] for b in model.get_submodule(n)._weight_names
        )
        row = {"format": fmt, "weights_bytes": _size(out), "export_s": round(export_s, 2),
               "read_s": round(read_s, 2), "codes_identical": same, "ppl_read_back": ppl(back)}
        if fmt == "compressed-tensors":
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
            row["ppl_transformers"] = ppl(hf)
        rows.append(row)
        print(row, flush=True)
    results["exports"] = rows

    python = Path(args.lcvenv) / "bin" / "python"
    if python.exists():
        lc_dir = work / "llmcompressor"
        test_ids = ids[:, :2048]
        torch.save(test_ids, work / "ids.pt")
        t = time.time()
        subprocess.run([str(python), "-c", LC_SCRIPT, str(float_dir), str(lc_dir), str(valid), str(work / "ids.pt"),
                        str(args.calib_samples), str(args.calib_len)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        results["llmcompressor_run_s"] = round(time.time() - t, 1)
        reference = torch.load(lc_dir / "reference_logits.pt", weights_only=True)
        t = time.time()
        lc_model, _ = holdall.load_model(lc_dir)
        read_s = time.time() - t
        with torch.no_grad():
            logits = lc_model(test_ids).logits
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(lc_dir)).eval()
        results["llmcompressor"] = {
            "gptq_s": round(json.loads((lc_dir / "reference_run.json").read_text())["gptq_seconds"], 1),
            "quant_linears_read": sum(isinstance(m, QuantLinear) for m in lc_model.modules()),
            "schemes": sorted({m.scheme.label for m in lc_model.modules() if isinstance(m, QuantLinear)}),
            "holdall_read_s": round(read_s, 2),
            "max_abs_logit_diff_vs_transformers_5.17": float((logits - reference).abs().max()),
            "ppl_holdall": ppl(lc_model),
            "ppl_transformers_this_env": ppl(hf),
        }
        print(results["llmcompressor"], flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "formats_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
