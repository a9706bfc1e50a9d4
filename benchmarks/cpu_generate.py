"""Batch-1 greedy decoding of SmolLM2-135M-Instruct on the CPU: ``holdall.generate`` beside transformers' ``generate``.

Same process, same weights, same prompt (the chat template around one user message), the same number of new
tokens (EOS ignored by both, so both decode exactly ``--new-tokens``): transformers' greedy ``generate`` (dynamic
cache) against holdall's static-cache decoder (eager on CPU: one preallocated KV cache, the step a fixed sequence of
ops), each the median of ``--repeats`` runs, tokens/s over the whole call (prefill included). Weights: the fp32
model and the same model RTN-quantized to int4 g64 (holdall's ``QuantLinear`` under both decoders). The tokens of the
two decoders are compared as well (equal up to the first near-tie of the logits). Usage::

    python benchmarks/cpu_generate.py [--new-tokens 64] [--repeats 3] [--out benchmarks/results/cpu_generate.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Explain in two sentences why quantized models need less memory."


def hf_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    seconds = time.perf_counter() - start
    return new_tokens / seconds, out[0, ids.shape[1]:].tolist()


def holdall_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    from holdall.serving.static_decode import StaticDecoder

    start = time.perf_counter()
    decoder = StaticDecoder(model, max_len=ids.shape[1] + new_tokens)  # built inside the timing: part of the call
    result = decoder.generate(ids[0], new_tokens)  # no EOS given: exactly new_tokens
    seconds = time.perf_counter() - start
    return new_tokens / seconds, result.tokens


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens the two decoders agree on."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_generate.json"))
    args = parser.parse_args()
    from machine_info import cpu_name

    from holdall.algorithms import QuantConfig, quantize
    from holdall.fileio import write_json
    from holdall.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    report = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "rows": []}
    for weights in ("fp32", "int4-g64-rtn"):
        if weights != "fp32":
            quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=64), progress=False)
        hf, ours = [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
            tps, hf_tokens = hf_tokens_per_s(model, ids, args.new_tokens)
            hf.append(tps)
            tps, our_tokens = holdall_tokens_per_s(model, ids, args.new_tokens)
            ours.append(tps)
        row = {"weights": weights, "hf_generate_tokens_per_s": round(statistics.median(hf), 2),
               "holdall_tokens_per_s": round(statistics.median(ours), 2),
               "speedup": round(statistics.median(ours) / statistics.median(hf), 2),
               "tokens_agreeing": agreement(hf_tokens, our_tokens), "all_runs": {"hf": hf, "holdall": ours}}
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_runs"}), flush=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
