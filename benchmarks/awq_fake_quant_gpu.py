"""AWQ's candidate weight ``Q(clip(W s)) / s`` on a GPU: the fused Triton pass against the eager torch passes.

One ``[11008, 4096]`` float32 weight (Llama-2-7B's gate/up), int4 g128 asymmetric with fp16 scales, column
scales in [0.5, 1.5): the mean time of one call over ``--calls`` (after one warm-up call, so compile time is not
in it), for the kernel alone (with and without per-group clip limits), for ``awq.scaled_fake_quantize`` as the
search calls it (kernel + the non-finite-scale flag read back), and for the same function with
``HOLDALL_KERNELS=0`` (the eager passes: scale, group max, divide, round, shift, clamp, multiply, divide back).
A ``torch.isfinite(out).all()`` pass over the output is timed as well: it is what the flag replaced. Usage (on the
device)::

    PYTHONPATH=src python3 benchmarks/awq_fake_quant_gpu.py [--calls 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from holdall.algorithms import awq
from holdall.algorithms import fake_quant_triton as fused
from holdall.core.scheme import QuantScheme


def mean_ms(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("awq_fake_quant_gpu.py times CUDA kernels: run it on the device machine")
    scheme = QuantScheme(bits=4, group_size=128, symmetric=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(11008, 4096, device="cuda", generator=g) * 0.02
    s = torch.rand(4096, device="cuda", generator=g) + 0.5
    limit = torch.rand(11008, 32, device="cuda", generator=g) * 0.05
    if not fused.usable(w, scheme):
        raise SystemExit("the fused kernel is not usable here (Triton missing, or HOLDALL_KERNELS=0)")
    result = {"device": torch.cuda.get_device_name(0), "shape": list(w.shape), "scheme": scheme.label}
    result["kernel_ms"] = mean_ms(lambda: fused.fake_quantize(w, scheme, s), args.calls)
    result["kernel_with_clip_ms"] = mean_ms(lambda: fused.fake_quantize(w, scheme, s, limit), args.calls)
    result["scaled_fake_quantize_fused_ms"] = mean_ms(lambda: awq.scaled_fake_quantize(w, scheme, s), args.calls)
    result["isfinite_pass_ms"] = mean_ms(lambda: bool(torch.isfinite(w).all()), args.calls)
    fused_out = awq.scaled_fake_quantize(w, scheme, s, limit)
    os.environ["HOLDALL_KERNELS"] = "0"
    result["scaled_fake_quantize_eager_ms"] = mean_ms(lambda: awq.scaled_fake_quantize(w, scheme, s), args.calls)
    result["bit_identical"] = bool(torch.equal(fused_out, awq.scaled_fake_quantize(w, scheme, s, limit)))
    result["eager_over_fused"] = round(result["scaled_fake_quantize_eager_ms"]
                                       / result["scaled_fake_quantize_fused_ms"], 2)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
