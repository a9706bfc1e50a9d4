"""2..64 rows on one GPU: the Triton ``v3`` GEMM vs the Gluon tensor-core GEMV's tilings vs bf16 cuBLAS (issue 6,
rounds 12-13), and what the dispatch now picks by itself.

    PYTHONPATH=src python3 bench/gemm_rows.py --out $OUT/gemm_rows.json [--rows 2,4,8,16,64] [--mma 1x4,1x8]
        [--schemes int4-g128-sym,nf4,nf4-dq]

For each weight shape ``[out, in]``, scheme (default int4 g128 symmetric; RTN) and row count it graph-times
(``gpu_kernels.py``'s harness: copies of the weight beyond the L2, median of rounds) ``F.linear`` on bf16 weights,
the ``v3`` GEMM with its heuristic's config (``triton_wq4.gemm_config``), every tensor-core config named in
``--mma`` (``gpu_kernels.mma_tilings``: ``TxW`` tilings unrolled ``u`` and in a loop ``l``, ``TxWaN`` loads run
``N`` rounds ahead), at 16+ rows the wgmma GEMM's configs named in ``--wgmma`` (round 15; ``wgWsS[tN][aN]``), and
``triton_wq4.gemm`` with no config (the default). Each kernel's output is checked against
the float32 reference first (max error relative to the largest output); a config that fails to compile or launch
is recorded as an error. Prints one JSON line per cell with the speed-ups over bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_kernels import (  # noqa: E402
    MORE_SCHEMES, SCHEMES, bench_graph, bf16_copies, int4_copies, mma_tilings, wgmma_tilings,
)
from holdall.kernels import packed  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]  # [out, in]


def checked(run, y: torch.Tensor, want: torch.Tensor) -> float:
    """Run once into a NaN-filled output; the max error relative to the reference's largest value."""
    y.fill_(float("nan"))
    run()
    return round(float((y.float() - want).abs().max() / want.abs().max()), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="2,4,8,16,64")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES),
                        help="weight shapes OUTxIN, comma-separated")
    parser.add_argument("--schemes", default="int4-g128-sym",
                        help=f"comma-separated, from {sorted({**SCHEMES, **MORE_SCHEMES})}")
    parser.add_argument("--mma", default="1x4,1x8,2x4",
                        help="tensor-core tilings, TILES x WK (1x8a3: loads 3 rounds ahead; gpu_kernels.mma_tilings)")
    parser.add_argument("--wgmma", default="",
                        help="wgmma GEMM configs (round 15) at 16+ rows: wgWsS[tN][aN], W warpgroups x S splits [TMA, N slots]"
                             " [weights N chunks ahead]")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_rows.py times CUDA kernels: run it on the device machine")
    from holdall.kernels import gluon_mma, gluon_wgmma, triton_wq4

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cells = []
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    for (out_f, in_f), scheme in itertools.product(shapes, args.schemes.split(",")):
        layers, p, ops, _ = int4_copies(out_f, in_f, {**SCHEMES, **MORE_SCHEMES}[scheme])
        copies = bf16_copies(out_f, in_f)
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
            want = packed.reference_linear(layers[0], x.float())
            y = torch.empty(m, out_f, device="cuda", dtype=torch.bfloat16)
            cell = {"shape": f"{out_f}x{in_f}", "scheme": scheme, "rows": m,
                    "bf16": round(bench_graph([lambda w=w: F.linear(x, w) for w in copies]), 2)}
            configs = {"v3": triton_wq4.gemm_config(p, m, sms), "default": None}
            for name, cfg in mma_tilings(args.mma).items():
                if (gluon_mma.column_tiles(m) < 8 or cfg["TILES"] == 1) \
                        and not (cfg.get("AHEAD") and gluon_mma.column_tiles(m) > 1):  # spills; loops only
                    configs[name] = cfg
            if m >= 16:
                configs.update(wgmma_tilings(args.wgmma))
            for name, cfg in configs.items():
                try:
                    error = checked(lambda: triton_wq4.gemm(ops[0], p, x, None, y, cfg), y, want)
                    us = bench_graph([lambda o=o, c=cfg: triton_wq4.gemm(o, p, x, None, y, c) for o in ops])
                except Exception as exc:  # one config failing to compile or launch must not end the sweep
                    cell[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    continue
                cell[name] = {"us": round(us, 2), "vs_bf16": round(cell["bf16"] / us, 2), "max_rel_error": error}
            cell["default_picks"] = (gluon_mma.gemm_config(p, m, sms) or gluon_wgmma.gemm_config(p, m, sms)
                                     or configs["v3"])["VARIANT"]
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
