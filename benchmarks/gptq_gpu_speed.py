"""GPTQ (and AWQ) wall time on a GPU at 7B width, beside the llm-compressor anchors measured the same way.

anchors.md ("On the GPU", `anchors/gpu_llmcompressor.py`, one H200): 4 decoder layers of Llama-2-7B width
(hidden 4096, ffn 11008, 32 heads, vocab 32000) with random bf16 weights (time does not depend on values),
GPTQ W4A16 g128 with 128 x 2048 calibration tokens: 26.0 s, 6.5 s per layer, ~3.5 min for 32 layers; AWQ
W4A16_ASYM g128 with 128 x 512: 22.8 s, 5.7 s per layer.

This script builds the same model (random N(0, 0.02) bf16 weights, random token ids), runs holdall's GPTQ
(int4 g128 symmetric, true-sequential, damp 0.01) with the model held on the CPU and each decoder layer moved to
the GPU in turn (`CalibrationConfig(device="cuda")`), and reports the time per layer; then the same for AWQ
(int4 g128 asymmetric, 128 x 512) when holdall has it. It also checks first, on a tiny random Llama, that
calibrating on the GPU gives the same codes as calibrating on the CPU (to float noise).

`--profile` instead runs one decoder layer with a synchronizing timer around each phase of the engine and of
GPTQ (capture, calibration forwards, Hessian accumulation, factorization, column loop, error report, re-run) and
prints where the time goes; the synchronizations cost a little, so its total is a bit above the plain run's.

The llm-compressor anchors are anchors.md's (another run). ``--llmc TOKENIZER_DIR`` also runs llm-compressor itself
on the same shape in the same call (``llmcompressor_gpu.py`` in its own process; llm-compressor and its
dependencies carried as wheels) and reports holdall's per-layer time over its. Usage:
  PYTHONPATH=src python benchmarks/gptq_gpu_speed.py [--layers 4] [--samples 128] [--seq-len 2048] [--out DIR]
  PYTHONPATH=src:/tmp/site python benchmarks/gptq_gpu_speed.py --no-check --llmc TOKENIZER_DIR --out DIR
  PYTHONPATH=src python benchmarks/gptq_gpu_speed.py --profile [--layers 1]
  PYTHONPATH=src python benchmarks/gptq_gpu_speed.py --profile-awq --no-check [--layers 2]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from holdall.algorithms import CalibrationConfig, GPTQConfig, QuantConfig, quantize
from holdall.algorithms.config import method_names
from holdall.core.linear import QuantLinear

ANCHOR = {"tool": "llm-compressor 0.14 (anchors.md, H200)", "layers": 4, "seconds": 26.0, "per_layer_s": 6.5}
AWQ_ANCHOR = {"tool": "llm-compressor 0.14 (anchors.md, H200)", "layers": 4, "seconds": 22.8, "per_layer_s": 5.7}


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


def awq_config(n: int, seq_len: int, device: str) -> QuantConfig:
    # the method's default scheme is int4 g128 asymmetric: llm-compressor's W4A16_ASYM
    return QuantConfig.for_method("awq", calibration=CalibrationConfig(n_samples=n, seq_len=seq_len, device=device))


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


def kernel_matches_loop(rows: int = 2048, cols: int = 1024) -> dict:
    """Code agreement of GPTQ's GPU column kernel with its torch column loop on the same GPU inputs.

    Isolates the kernel from the rest of the GPU-vs-CPU difference (cuBLAS vs CPU float sums in the forwards and
    Hessians). One code differing feeds a different error to every later column, so a single rounding tie can
    move a few codes after it: agreement slightly under 1 is float rounding, a wrong kernel gives ~0.1–0.5.
    """
    from holdall.algorithms import gptq
    from holdall.core.scheme import QuantScheme

    if not gptq._use_triton(torch.empty(1, device="cuda")):
        return {"skipped": "no Triton"}
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4 * cols, cols, device="cuda", generator=gen)
    x = x @ torch.randn(cols, cols, device="cuda", generator=gen)  # correlated inputs: a far-from-diagonal H
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, device="cuda", generator=gen) * 0.02
    hinv, _, _ = gptq.inverse_hessian_factor(H, GPTQConfig())
    out = {}
    for label, scheme in (("int4-g128-sym", QuantScheme(bits=4, group_size=128)),
                          ("int3-g64-asym", QuantScheme(bits=3, group_size=64, symmetric=False))):
        g = scheme.group_size
        group_of = torch.arange(cols, device="cuda") // g
        codes = []
        for fn in (gptq._blocks_torch, gptq._blocks_triton):
            scale, zero = gptq._empty_qparams(w, scheme)
            codes.append(fn(w.t().contiguous(), hinv, scale, zero, group_of, scheme, 128, g, False))
        out[label] = round(float((codes[0] == codes[1]).float().mean()), 5)
    return out


# --- profiling ------------------------------------------------------------------------------------------
# (module attribute, label): the engine's and GPTQ's phases; names a version lacks are skipped
PHASES = [
    ("holdall.algorithms.sequential:capture_inputs", "capture (embeddings, first-layer inputs)"),
    ("holdall.algorithms.sequential:_run_layer", "calibration forwards (incl. Hessian hooks)"),
    ("holdall.algorithms.gptq:HessianObserver.add_batch", "  Hessian accumulation (X^T X)"),
    ("holdall.algorithms.sequential:_requantized_outputs", "re-run of the quantized layer"),
    ("holdall.algorithms.gptq:GPTQQuantizer.quantize", "GPTQ per linear group (all below)"),
    ("holdall.algorithms.gptq:inverse_hessian_factor", "  Cholesky / inverse factor"),
    ("holdall.algorithms.gptq:_quantize_columns", "  column loop"),
    ("holdall.algorithms.gptq:output_error", "  error report (vs RTN)"),
    ("holdall.algorithms.awq:AWQQuantizer.quantize", "AWQ per scaling group (all below)"),
    ("holdall.algorithms.awq:_BlockLoss.__init__", "  block float outputs (reference)"),
    ("holdall.algorithms.awq:_BlockLoss.loss", "  block re-runs (one per candidate)"),
    ("holdall.algorithms.awq:_LinearLoss.__init__", "  Gram X^T X (o / down)"),
    ("holdall.algorithms.awq:_LinearLoss.loss", "  linear loss tr(D H D^T) (one per candidate)"),
    ("holdall.algorithms.awq:clip_search", "  clip search"),
    ("holdall.algorithms.awq:scaled_fake_quantize", "  fake quantize (inside the above)"),
]


def install_phase_timers() -> dict[str, list[float]]:
    """Wrap each phase in a CUDA-synchronizing timer; returns the {label: [seconds, calls]} it fills."""
    import importlib

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for target, label in PHASES:
        module_name, _, attr = target.partition(":")
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        original = getattr(owner, name)

        def timed(*args, __original=original, __label=label, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                totals[__label][0] += time.perf_counter() - t0
                totals[__label][1] += 1

        setattr(owner, name, functools.wraps(original)(timed))
    return totals


def profile(layers: int, samples: int, seq_len: int, method: str = "gptq") -> dict:
    totals = install_phase_timers()
    model = llama(4096, 11008, layers, 32, 32000, torch.bfloat16)
    ids = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    config = (gptq_config if method == "gptq" else awq_config)(samples, seq_len, "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize(model, config, progress=False, calibration_data=ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    layer_s = sum(layer["seconds"] for layer in model.holdall_quant["report"]["layers"])
    table = {label: {"seconds": round(totals[label][0], 3), "calls": totals[label][1]} for _, label in PHASES
             if label in totals}
    print(f"profile ({method}): {layers} layer(s), {samples}x{seq_len}: {seconds:.2f} s in all, {layer_s:.2f} s in the "
          "layer loop")
    for label, row in table.items():
        print(f"  {label:46s} {row['seconds']:8.3f} s  ({row['calls']} calls)")
    return {"seconds": round(seconds, 2), "layer_loop_s": round(layer_s, 2), "phases": table}


# --- timing ---------------------------------------------------------------------------------------------
def time_method(config: QuantConfig, layers: int, samples: int, seq_len: int) -> dict:
    model = llama(4096, 11008, layers, 32, 32000, torch.bfloat16)
    ids = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize(model, config, progress=True, calibration_data=ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report = model.holdall_quant["report"]
    ratios = [i["rel_error"] / i["rtn_rel_error"] for i in report["linears"].values()
              if i.get("rel_error") is not None and i.get("rtn_rel_error")]
    return {
        "layers": layers, "calibration": f"{samples}x{seq_len}", "seconds": round(seconds, 1),
        "per_layer_s": round(seconds / layers, 2),
        "layer_seconds": [round(layer["seconds"], 2) for layer in report["layers"]],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "linear_error_vs_rtn": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "layer_rel_error": [None if layer["rel_error"] is None else round(layer["rel_error"], 4)
                            for layer in report["layers"]],
    }


def llmcompressor_same_run(tokenizer: str, layers: int, result: dict) -> dict:
    """llm-compressor's GPTQ and AWQ on the same shape in its own process, now, and holdall's time over its."""
    import subprocess
    import sys

    script = Path(__file__).with_name("llmcompressor_gpu.py")
    done = subprocess.run([sys.executable, str(script), "--tokenizer", tokenizer, "--layers", str(layers)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        failed = {"failed": " | ".join(done.stderr.strip().splitlines()[-3:])[:500]}
        print("llm-compressor, same call, failed:", failed["failed"], flush=True)
        return failed
    llmc = json.loads(done.stdout.strip().splitlines()[-1])
    for method, ours in (("gptq", result.get("holdall")), ("awq", result.get("awq"))):
        theirs = llmc.get(method, {})
        if ours and "per_layer_s" in theirs:
            theirs["holdall_over_llmc"] = round(ours["per_layer_s"] / theirs["per_layer_s"], 3)
    print("llm-compressor, same call:", json.dumps(llmc), flush=True)
    return llmc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 1 with --profile)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--awq-samples", type=int, default=128)
    parser.add_argument("--awq-seq-len", type=int, default=512)
    parser.add_argument("--no-awq", action="store_true", help="skip the AWQ timing")
    parser.add_argument("--no-check", action="store_true", help="skip the GPU-vs-CPU code check")
    parser.add_argument("--profile", action="store_true", help="per-phase breakdown of one GPTQ run")
    parser.add_argument("--profile-awq", action="store_true",
                        help="per-phase breakdown of one AWQ run (--awq-samples x --awq-seq-len)")
    parser.add_argument("--check-only", action="store_true", help="only the code-agreement checks")
    parser.add_argument("--llmc", metavar="TOKENIZER_DIR", default=None,
                        help="also time llm-compressor's GPTQ and AWQ in this call (benchmarks/llmcompressor_gpu.py, "
                             "its own process; needs llmcompressor importable, e.g. from carried wheels)")
    parser.add_argument("--out", default=None, help="directory for gptq_gpu_speed.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "anchor": ANCHOR}
    if not args.no_check:
        result["gpu_vs_cpu_code_agreement"] = round(gpu_matches_cpu(), 5)
        print("GPU vs CPU code agreement:", result["gpu_vs_cpu_code_agreement"], flush=True)
        try:
            result["gpu_kernel_vs_torch_loop_agreement"] = kernel_matches_loop()
        except AttributeError:  # a holdall from before the kernel
            result["gpu_kernel_vs_torch_loop_agreement"] = {"skipped": "no kernel in this version"}
        print("GPU column kernel vs torch loop code agreement:", result["gpu_kernel_vs_torch_loop_agreement"],
              flush=True)

    if args.check_only:
        pass
    elif args.profile:
        result["profile"] = profile(args.layers or 1, args.samples, args.seq_len)
    elif args.profile_awq:
        result["profile_awq"] = profile(args.layers or 1, args.awq_samples, args.awq_seq_len, "awq")
    else:
        layers = args.layers or 4
        result["holdall"] = time_method(gptq_config(args.samples, args.seq_len, "cuda"), layers, args.samples,
                                        args.seq_len)
        result["holdall"]["vs_anchor"] = round(result["holdall"]["per_layer_s"] / ANCHOR["per_layer_s"], 3)
        print("GPTQ:", json.dumps(result["holdall"]), flush=True)
        if not args.no_awq and "awq" in method_names():
            awq = time_method(awq_config(args.awq_samples, args.awq_seq_len, "cuda"), layers, args.awq_samples,
                              args.awq_seq_len)
            awq["vs_anchor"] = round(awq["per_layer_s"] / AWQ_ANCHOR["per_layer_s"], 3)
            result["awq"], result["awq_anchor"] = awq, AWQ_ANCHOR
            print("AWQ:", json.dumps(awq), flush=True)
        if args.llmc:
            result["llmcompressor_same_run"] = llmcompressor_same_run(args.llmc, layers, result)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = ("gptq_gpu_profile.json" if args.profile else "awq_gpu_profile.json" if args.profile_awq
                else "gptq_gpu_speed.json")
        (Path(args.out) / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
