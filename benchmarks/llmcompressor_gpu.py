"""llm-compressor's GPTQ and AWQ wall time on Llama-2-7B-width layers: the reference side of
``gptq_gpu_speed.py --llmc`` (same card, same device call as holdall's timing).

It runs in its own process, so llm-compressor's imports and memory stay out of holdall's measurement. The
protocol is the anchor's (``../shared/anchors/gpu_llmcompressor.py``, anchors.md "On the GPU"): a Llama model of
``--layers`` decoder layers at Llama-2-7B width with random N(0, 0.02) bf16 weights, saved to a directory and
loaded back onto the device as a user would; random token ids as calibration (GPTQ ``W4A16`` = int4 g128
symmetric on 128 x 2048 tokens, AWQ ``W4A16_ASYM`` = int4 g128 asymmetric on 128 x 512: llm-compressor's
defaults); every Linear but lm_head; the wall time of ``oneshot`` (loading excluded). Prints one JSON line.

    python benchmarks/llmcompressor_gpu.py --tokenizer DIR [--layers 4] [--methods gptq,awq] [--device cuda]

``--tokenizer``: any Hugging Face tokenizer directory (the calibration data is already token ids; llm-compressor
wants one beside the model). The smaller ``--hidden/--ffn/--heads/--vocab/--samples`` settings exist to check
this script on a CPU with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SCHEMES = {"gptq": ("GPTQModifier", "W4A16", 2048), "awq": ("AWQModifier", "W4A16_ASYM", 512)}


def save_model(directory: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(directory)


def time_method(method: str, directory: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    modifier_name, scheme, seq_len = SCHEMES[method]
    seq_len = args.seq_len or seq_len
    modifier = {"GPTQModifier": GPTQModifier, "AWQModifier": AWQModifier}[modifier_name](
        targets="Linear", scheme=scheme, ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=args.device)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = torch.randint(0, args.vocab, (args.samples, seq_len), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_list([{"input_ids": row.tolist(), "attention_mask": [1] * seq_len} for row in ids])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=seq_len, num_calibration_samples=args.samples,
            processor=tokenizer)
    sync()
    seconds = time.perf_counter() - start
    return {"scheme": scheme, "calibration": f"{args.samples}x{seq_len}", "seconds": round(seconds, 1),
            "per_layer_s": round(seconds / args.layers, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=None, help="override both methods' calibration length")
    args = parser.parse_args()
    import llmcompressor
    import torch

    result = {"tool": f"llm-compressor {llmcompressor.__version__}", "layers": args.layers,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="llmc-gpu-") as tmp:
        save_model(Path(tmp), args)
        for method in [m for m in args.methods.split(",") if m]:
            if method not in SCHEMES:
                raise SystemExit(f"unknown method {method!r}: choose from {', '.join(SCHEMES)}")
            try:
                result[method] = time_method(method, Path(tmp), args)
            except Exception as error:  # a failure is a result to report (anchors.md: AWQ fails without a GPU)
                result[method] = {"failed": f"{type(error).__name__}: {error}"[:300]}
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
