"""One 4-bit layer's forward (batch 1, or ``--rows`` activation rows), launched a fixed number of times: a target
for Nsight Compute.

The round-2 GEMVs reach ~30% of copy bandwidth, and halving their instructions per code made them slower
(BENCHMARKS.md, "GPU: 4-bit kernels"): the next step is to read the hardware counters (achieved occupancy, stall
reasons, L1/L2 traffic) instead of guessing. This script builds one ``QuantLinear`` of Llama-2-7B shape with
random weights, checks its output against the plain-torch reference once, then calls ``forward`` on one bf16 row
``--calls`` times (the ``triton-wq4`` backend's GEMV), and prints the median time of one call (CUDA events).

On the device (Firecracker runtime; ``--clock-control none`` as METHOD.md asks)::

    ncu --clock-control none --kernel-name regex:gemv --launch-skip 20 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        --section LaunchStats --section SourceCounters \\
        python3 bench/gemv_probe.py --format int4 --shape 4096x11008

``--config '{"BLOCK_N": 8, ...}'`` launches ``triton_wq4.gemv`` directly with that configuration instead.
``--rows 64`` calls the layer on 64 rows (the dispatch's small-batch GEMM; ``bench/ncu_gemv.sh`` with
``KERNEL=gemm_wgmma`` profiles it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from holdall.core.linear import QuantLinear  # noqa: E402
from holdall.core.scheme import QuantScheme  # noqa: E402
from holdall.kernels import packed  # noqa: E402

FORMATS = {
    "int4": QuantScheme(bits=4, group_size=128),
    "int4-asym": QuantScheme(bits=4, group_size=128, symmetric=False),
    "nf4": QuantScheme(dtype="nf4", group_size=64),
    "nf4-dq": QuantScheme(dtype="nf4", group_size=64, double_quant=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=sorted(FORMATS), default="int4")
    parser.add_argument("--shape", default="4096x11008", help="OUTxIN of the weight")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--config", default=None, help="a JSON launch configuration for triton_wq4.gemv")
    parser.add_argument("--rows", type=int, default=1, help="activation rows (the layer's forward; not with --config)")
    args = parser.parse_args()
    if args.rows < 1 or (args.config and args.rows != 1):
        raise SystemExit("--rows must be 1 or more, and 1 with --config (the GEMV takes one row)")
    if not torch.cuda.is_available():
        raise SystemExit("gemv_probe.py launches the CUDA kernels: run it on the device machine")
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data.normal_(0, 0.02)
    layer = QuantLinear.from_linear(linear, FORMATS[args.format]).cuda()
    x = torch.randn(args.rows, in_f, device="cuda", dtype=torch.bfloat16)
    p = packed.plan(layer)
    if args.config:
        from holdall.kernels import triton_wq4

        ops, config = packed.operands(layer, p), json.loads(args.config)
        out = torch.empty(out_f, device="cuda", dtype=torch.bfloat16)

        def call():
            return triton_wq4.gemv(ops, p, x[0], None, out, config)
    else:
        def call():
            with torch.no_grad():
                return layer(x)
    want = packed.reference_linear(layer, x.float())
    got = call().float().reshape(want.shape)
    error = float((got - want).abs().max() / want.abs().max())
    if error > 1e-2:
        raise SystemExit(f"the kernel's output is off the reference by {error:.3g} of its largest value")
    times = []
    for _ in range(args.calls):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    weight_bytes = sum(t.numel() * t.element_size() for t in layer.buffers())
    us = statistics.median(times)
    print(json.dumps({"format": args.format, "shape": args.shape, "rows": args.rows, "median_us": round(us, 2),
                      "weight_GB_per_s": round(weight_bytes / (us * 1e-6) / 1e9, 1), "max_rel_error": error}))


if __name__ == "__main__":
    main()
