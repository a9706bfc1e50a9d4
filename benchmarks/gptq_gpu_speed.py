"""GPTQ wall time on a GPU at 7B width, beside the llm-compressor anchor measured the same way.

anchors.md ("On the GPU", `anchors/gpu_llmcompressor.py`, one H200): 4 decoder layers of Llama-2-7B width
(hidden 4096, ffn 11008, 32 heads, vocab 32000) with random bf16 weights (time does not depend on values),
GPTQ W4A16 g128 with 128 x 2048 calibration tokens: 26.0 s, 6.5 s per layer, ~3.5 min for 32 layers.

This script builds the same model (random N(0, 0.02) bf16 weights, random token ids), runs holdall's GPTQ
(int4 g128 symmetric, true-sequential, damp 0.01) with the model held on the CPU and each decoder layer moved to
the GPU in turn (`CalibrationConfig(device="cuda")`), and reports the time per layer. It also checks first, on a
tiny random Llama, that calibrating on the GPU gives the same codes as calibrating on the CPU (to float noise).

The llm-compressor number is anchors.md's, not re-measured here (its own venv would have to travel as wheels);
the comparison is across runs, so it is indicative only. Usage:
  PYTHONPATH=src python benchmarks/gptq_gpu_speed.py [--layers 4] [--samples 128] [--seq-len 2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from holdall.algorithms import CalibrationConfig, GPTQConfig, QuantConfig, quantize
from holdall.core.linear import QuantLinear

ANCHOR = {"tool": "llm-compressor 0.14 (anchors.md, H200)", "layers": 4, "seconds": 26.0, "per_layer_s": 6.5}


def llama(hidden: int, ffn: int, layers: int, heads: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def gptq_config(n: int, seq_len: int, device: str) -> QuantConfig:
    return QuantConfig.for_method("gptq", bits=4, group_size=128, options=GPTQConfig(),
                                  calibration=CalibrationConfig(n_samples=n, seq_len=seq_len, device=device))


def codes_of(model) -> dict[str, torch.Tensor]:
    return {n: m.qdata.cpu() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def gpu_matches_cpu() -> float:
    """Fraction of packed code bytes that agree between a CPU and a GPU calibration of the same tiny model."""
    base = llama(256, 512, 2, 4, 512, torch.float32)
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    on_cpu = quantize(copy.deepcopy(base), gptq_config(8, 128, "cpu"), progress=False, calibration_data=ids)
    on_gpu = quantize(copy.deepcopy(base), gptq_config(8, 128, "cuda"), progress=False, calibration_data=ids)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters()), "the model must stay where it was"
    a, b = codes_of(on_cpu), codes_of(on_gpu)
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=None, help="directory for gptq_gpu_speed.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "anchor": ANCHOR}
    result["gpu_vs_cpu_code_agreement"] = round(gpu_matches_cpu(), 5)
    print("GPU vs CPU code agreement:", result["gpu_vs_cpu_code_agreement"], flush=True)

    model = llama(4096, 11008, args.layers, 32, 32000, torch.bfloat16)
    ids = torch.randint(0, 32000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize(model, gptq_config(args.samples, args.seq_len, "cuda"), progress=True, calibration_data=ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report = model.holdall_quant["report"]
    result["holdall"] = {
        "layers": args.layers, "calibration": f"{args.samples}x{args.seq_len}", "seconds": round(seconds, 1),
        "per_layer_s": round(seconds / args.layers, 2),
        "layer_seconds": [round(layer["seconds"], 2) for layer in report["layers"]],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "linear_error_vs_rtn": round(
            sum(i["rel_error"] / i["rtn_rel_error"] for i in report["linears"].values()) / len(report["linears"]), 3
        ),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gptq_gpu_speed.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
