"""Run llm-compressor's GPTQ on a Hugging Face directory with given calibration token ids; save it compressed.

This file runs in llm-compressor's own virtual environment (it pins transformers 5.17), never in holdall's;
``gptq_quality.py --methods llmc-gptq`` calls it through a subprocess and reads the result back with holdall's
compressed-tensors reader, so both tools are scored by the same code on the same windows::

    /work/lcvenv/bin/python benchmarks/llmcompressor_gptq.py HF_DIR CALIB.pt BITS GROUP OUT_DIR THREADS

llm-compressor's defaults are kept (its GPTQModifier: static act-order, dampening 0.01, blocks of 128); the
scheme is symmetric int, groups of GROUP, every Linear but lm_head — the anchor script's settings. Prints one JSON
line: ``{"quantize_s": ..., "quantize_cpu_s": ...}`` (oneshot's wall and process CPU time, model loading
excluded; CPU time is what to compare on a machine other jobs share).
"""

from __future__ import annotations

import json
import sys
import time


def main(hf_dir: str, calib: str, bits: int, group: int, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(calib, weights_only=True)  # [n_samples, seq_len] int64
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group))
    data = Dataset.from_list([{"input_ids": row.tolist(), "attention_mask": [1] * ids.shape[1]} for row in ids])
    modifier = GPTQModifier(config_groups={"g0": scheme}, ignore=["lm_head"])
    start, cpu_start = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"quantize_s": seconds, "quantize_cpu_s": cpu_seconds}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), a[4], int(a[5]))
