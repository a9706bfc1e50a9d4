"""The Gluon one-row GEMV's tilings beside round 9's TMA kernel and bf16 cuBLAS, on Llama-2-7B's decode shapes
(issue 6, round 10; BENCHMARKS.md). On the device machine::

    PYTHONPATH=src python3 bench/gluon_sweep.py --out $OUT/gluon_sweep.json

Int4 g128 symmetric weights (random, N(0, 0.02)), one bf16 row; every tiling's output is checked against the
fp32 reference (``max_rel_error``) before it is timed with ``gpu_kernels.bench_graph`` (CUDA graph over enough
weight copies that L2 never holds the next one). ``triton`` is :func:`holdall.kernels.triton_wq4.gemv` with the
configuration it picks when the Gluon kernel is switched off (``HOLDALL_GLUON=0``); ``default`` is what it picks
now. ``--int8``: the same for the W4A8 path (``XQ8``; its tiling was not swept in round 10). Round 11: ``--modes``,
how each tiling is launched -- ``nopdl`` plainly, ``pdl-t0/1/2`` with programmatic dependent launch and 0-2 row
tiles' weights loaded into registers before the wait, ``-l2`` with the rest of the rows prefetched into L2 there
(the timed calls run back to back in one graph, as a decode step's GEMVs do). Cells: ``g{rows}x{warps}-{mode}``.
``default_us`` / ``default_in_decode_us`` time the two defaults themselves. ``--scheme``: another format (round 14:
NF4 / NF4 + double quant, whose one-row default is the tensor-core GEMV; pass ``--tilings ''``, the Gluon FMA
tilings take int4 sym only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import (MORE_SCHEMES, SCHEMES, bench_graph, bf16_copies, copy_bandwidth,  # noqa: E402
                         int4_copies, mma_tilings)
from holdall.kernels import packed  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (22016, 4096), (12288, 4096)]  # [out, in]
MODES = {"nopdl": {"PDL": False}, "pdl-t0": {"PDL": True, "PDL_TILES": 0}, "pdl-t1": {"PDL": True, "PDL_TILES": 1},
         "pdl-t2": {"PDL": True, "PDL_TILES": 2}, "pdl-t0-l2": {"PDL": True, "PDL_TILES": 0, "PDL_L2": True},
         "pdl-t1-l2": {"PDL": True, "PDL_TILES": 1, "PDL_L2": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tilings", default="8x2,16x2,8x4", help="rows per thread x warps along the row")
    parser.add_argument("--mma", default="",
                        help="round 12: also the tensor-core GEMV (float activations), tilings as tiles x warps, "
                             "e.g. 1x4,2x4,4x4,1x8,2x8; each with its rounds unrolled (u) and in a loop (l); "
                             "1x8a3: unrolled, loads 3 rounds ahead (gpu_kernels.mma_tilings)")
    parser.add_argument("--modes", default="nopdl,pdl-t0,pdl-t1,pdl-t2,pdl-t0-l2,pdl-t1-l2",
                        help="launch modes (see above)")
    parser.add_argument("--scheme", default="int4-g128-sym", choices=sorted({**SCHEMES, **MORE_SCHEMES}),
                        help="the weights' format (the Gluon FMA tilings take int4 sym only: --tilings '' for others)")
    parser.add_argument("--int8", action="store_true",
                        help="the W4A8 path instead (XQ8: activations rounded to int8 in the kernel, DP4A), checked "
                             "against the reference on the rounded activations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gluon_sweep.py times CUDA kernels: run it on the device machine")
    from holdall.kernels import triton_wq4  # Triton: only where the kernels run

    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "copy_GBps": round(copy_bandwidth(), 1), "int8": args.int8,
            "scheme": args.scheme}
    print(json.dumps(info), flush=True)
    rows_out = []
    for out_f, in_f in SHAPES:
        layers, p, ops, nbytes = int4_copies(out_f, in_f, {**SCHEMES, **MORE_SCHEMES}[args.scheme])
        x = torch.randn(in_f, device="cuda", dtype=torch.bfloat16)
        xr = packed.round_activations_s8(x.float()) if args.int8 else x.float()
        want = packed.reference_linear(layers[0], xr[None])[0]
        y = torch.empty(out_f, device="cuda", dtype=torch.bfloat16)
        row = {"shape": f"{out_f}x{in_f}", "weight_MB": round(nbytes / 1e6, 2)}
        copies = bf16_copies(out_f, in_f)
        row["bf16"] = round(bench_graph([lambda w=w: F.linear(x, w) for w in copies]), 2)
        os.environ["HOLDALL_GLUON"] = "0"
        try:
            tma = triton_wq4.default_gemv_config(ops[0], p, x.device, int8_activations=args.int8)
        finally:
            del os.environ["HOLDALL_GLUON"]
        row["triton"] = round(bench_graph([lambda o=o: triton_wq4.gemv(o, p, x, None, y, tma) for o in ops]), 2)
        row["default"] = triton_wq4.default_gemv_config(ops[0], p, x.device, int8_activations=args.int8)
        row["default_in_decode"] = triton_wq4.default_gemv_config(ops[0], p, x.device, args.int8, chained=True)
        for key in ("default", "default_in_decode"):  # the defaults themselves, checked then timed
            y.fill_(float("nan"))
            triton_wq4.gemv(ops[0], p, x, None, y, row[key])
            error = float((y.float() - want).abs().max() / want.abs().max())
            us = bench_graph([lambda o=o, c=row[key]: triton_wq4.gemv(o, p, x, None, y, c) for o in ops])
            row[f"{key}_us"] = {"us": round(us, 2), "max_rel_error": round(error, 5)}
        for tiling, mode in itertools.product(filter(None, args.tilings.split(",")), args.modes.split(",")):
            block_n, wk = (int(v) for v in tiling.split("x"))
            cfg = {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk, "XQ8": args.int8, **MODES[mode]}
            y.fill_(float("nan"))
            triton_wq4.gemv(ops[0], p, x, None, y, cfg)
            error = float((y.float() - want).abs().max() / want.abs().max())
            us = bench_graph([lambda o=o: triton_wq4.gemv(o, p, x, None, y, cfg) for o in ops])
            row[f"g{tiling}-{mode}"] = {"us": round(us, 2), "max_rel_error": round(error, 5)}
        if args.mma and not args.int8:
            from holdall.kernels import gluon_mma

            for name, cfg in mma_tilings(args.mma).items():
                cfg = {**cfg, "PDL": True}
                y.fill_(float("nan"))
                try:
                    gluon_mma.gemv(ops[0], p, x, None, y, cfg)
                    error = float((y.float() - want).abs().max() / want.abs().max())
                    us = bench_graph([lambda o=o, c=cfg: gluon_mma.gemv(o, p, x, None, y, c) for o in ops])
                except Exception as exc:  # one tiling failing to compile or launch must not end the sweep
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    continue
                row[name] = {"us": round(us, 2), "max_rel_error": round(error, 5)}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
