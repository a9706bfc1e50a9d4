"""Batch-1 greedy decoding of SmolLM2-135M-Instruct on the CPU: ``holdall.generate`` beside transformers' ``generate``.

Same process, same weights, same prompt (the chat template around one user message), the same number of new
tokens (EOS ignored by both, so both decode exactly ``--new-tokens``): transformers' greedy ``generate`` (dynamic
cache) against holdall's static-cache decoder (eager on CPU: one preallocated KV cache, the step a fixed sequence of
ops), each the median of ``--repeats`` runs, tokens/s over the whole call (prefill included). Weights: the fp32
model and the same model RTN-quantized to int4 g64 (holdall's ``QuantLinear`` under both decoders), computing in
fp32 and in bf16, the bf16 one also with the opt-in CPU int4 kernel (``holdall.kernels.cpu_int4``; the other rows use
the reference path). The tokens of the two decoders are compared as well (equal up to the first near-tie of the
logits). Beside them llama.cpp (llama-cpp-python, ``n_threads`` = torch's threads) decoding the Q4_1 GGUF the model
ships as, EOS suppressed, the same prompt text and token count: the CPU incumbent for 4-bit decoding. Usage::

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


def holdall_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, cpu_int4: bool = False) -> tuple[float, list[int]]:
    import contextlib

    from holdall.kernels import cpu_int4 as kernel
    from holdall.serving.static_decode import StaticDecoder

    with kernel.enabled() if cpu_int4 else contextlib.nullcontext():
        start = time.perf_counter()
        decoder = StaticDecoder(model, max_len=ids.shape[1] + new_tokens)  # built inside the timing: part of the call
        result = decoder.generate(ids[0], new_tokens)  # no EOS given: exactly new_tokens
        seconds = time.perf_counter() - start
    return new_tokens / seconds, result.tokens


def llamacpp_tokens_per_s(text: str, new_tokens: int, repeats: int, threads: int) -> dict:
    """llama.cpp on the GGUF the model ships as (Q4_1), greedy, EOS suppressed: median tokens/s of whole calls."""
    from llama_cpp import Llama

    from holdall.models.loading import resolve_model

    path = resolve_model("smollm2").location
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    bias = {llm.token_eos(): -1e9}
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.create_completion(text, max_tokens=new_tokens, temperature=0.0, logit_bias=bias)
        speeds.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    return {"weights": "llama.cpp Q4_1 (the shipped GGUF)", "tokens_per_s": round(statistics.median(speeds), 2),
            "all_runs": speeds}


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
    for weights in ("fp32", "int4-g64-rtn", "int4-g64-rtn-bf16"):
        if weights == "int4-g64-rtn":
            quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=64), progress=False)
        if weights.endswith("bf16"):
            model = model.to(torch.bfloat16)
        hf, ours, kernel = [], [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all
            tps, hf_tokens = hf_tokens_per_s(model, ids, args.new_tokens)
            hf.append(tps)
            tps, our_tokens = holdall_tokens_per_s(model, ids, args.new_tokens)
            ours.append(tps)
            if weights.endswith("bf16"):
                tps, kernel_tokens = holdall_tokens_per_s(model, ids, args.new_tokens, cpu_int4=True)
                kernel.append(tps)
        row = {"weights": weights, "hf_generate_tokens_per_s": round(statistics.median(hf), 2),
               "holdall_tokens_per_s": round(statistics.median(ours), 2),
               "speedup": round(statistics.median(ours) / statistics.median(hf), 2),
               "tokens_agreeing": agreement(hf_tokens, our_tokens), "all_runs": {"hf": hf, "holdall": ours}}
        if kernel:
            row.update(holdall_cpu_int4_tokens_per_s=round(statistics.median(kernel), 2),
                       cpu_int4_speedup=round(statistics.median(kernel) / statistics.median(hf), 2),
                       cpu_int4_tokens_agreeing=agreement(hf_tokens, kernel_tokens))
            row["all_runs"]["holdall_cpu_int4"] = kernel
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_runs"}), flush=True)
    report["llama_cpp"] = llamacpp_tokens_per_s(text, args.new_tokens, args.repeats, torch.get_num_threads())
    print(json.dumps({k: v for k, v in report["llama_cpp"].items() if k != "all_runs"}), flush=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
