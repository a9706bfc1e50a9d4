"""One 4-bit layer on the CPU: torch's int4 matmul (``holdall.kernels.cpu_int4``) against holdall's reference path
(dequantize to bf16, then one matmul) and the fp32 dense matmul, at 1..256 rows -- where the opt-in backend's
``MAX_ROWS`` comes from.

SmolLM2-135M's gate/up shape (1536 x 576), int4 g64 symmetric, bf16 activations; mean microseconds of one call
over enough calls to take ~0.2 s, after one warm-up call. Usage::

    python benchmarks/cpu_int4_matmul.py [--out benchmarks/results/cpu_int4_matmul.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def mean_us(fn, budget_s: float = 0.2) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_int4_matmul.json"))
    args = parser.parse_args()
    from machine_info import cpu_name

    from holdall.core import backends
    from holdall.core.linear import QuantLinear
    from holdall.core.scheme import QuantScheme
    from holdall.fileio import write_json
    from holdall.kernels import cpu_int4

    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=False)
    layer = QuantLinear.from_linear(linear, QuantScheme(group_size=64)).to(torch.bfloat16)
    dense = linear.weight.detach().float()
    rows_out = []
    with torch.no_grad(), cpu_int4.enabled():
        for rows in (1, 16, 32, 64, 128, 256):
            x = torch.randn(rows, 576, dtype=torch.bfloat16)
            kernel = mean_us(lambda: cpu_int4.forward(layer, x))
            reference = mean_us(lambda: backends.reference_forward(layer, x))
            xf = x.float()
            fp32 = mean_us(lambda: F.linear(xf, dense))
            row = {"rows": rows, "cpu_int4_us": round(kernel, 1), "reference_bf16_us": round(reference, 1),
                   "fp32_dense_us": round(fp32, 1), "speedup_vs_reference": round(reference / kernel, 2)}
            rows_out.append(row)
            print(row, flush=True)
    write_json(args.out, {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "shape": [1536, 576], "scheme": "int4-g64-sym", "rows": rows_out})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
