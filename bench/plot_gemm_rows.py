"""Speed-up over bf16 cuBLAS against the number of activation rows, from ``bench/gemm_rows.py`` runs: the default
(solid) and the round-6 ``v3`` GEMM (dashed) per weight format, one panel per 7B shape, bf16 at 1.0.

    python bench/plot_gemm_rows.py bench/results/gemm_rows_h200_round13_xs.json \\
        bench/results/gemm_rows_h200_round13_default.json bench/results/gemm_rows_h200_round13_nf4_default.json \\
        --out bench/results/gemm_rows_h200_round13.png

Later files override earlier ones cell by cell (shape, format, rows), so a confirming run's cells replace the
sweep's. Each ratio is against the bf16 time of its own run. Runs on any machine (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_kernels import plot  # noqa: E402  (the same panels as the kernel table's plot)

DEFAULT_SCHEME = "int4-g128-sym"  # gemm_rows.py runs before --schemes timed only this format


def cells(runs: list[dict]) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(shape, scheme, rows) -> {"default": x, "v3": x}`` speed-ups over bf16, later runs winning."""
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for run in runs:
        for cell in run["cells"]:
            key = (cell["shape"], cell.get("scheme", DEFAULT_SCHEME), int(cell["rows"]))
            out[key] = {kernel: round(cell["bf16"] / cell[kernel]["us"], 3) for kernel in ("default", "v3")
                        if "us" in cell.get(kernel, {})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    points = cells(runs)
    if not points:
        raise SystemExit(f"{args.runs[0]}: no cells with a default or v3 timing")
    schemes = list(dict.fromkeys(scheme for _, scheme, _ in points))
    series = {(shape, rows, f"{scheme} {kernel}"): value
              for (shape, scheme, rows), kernels in points.items() for kernel, value in kernels.items()}
    labels = {f"{scheme} {kernel}": f"{scheme}, {kernel}" for scheme in schemes for kernel in ("default", "v3")}
    styles = {key: "--" if key.endswith("v3") else "-" for key in labels}
    plot(series, labels, f"4-bit GEMM, 2..64 rows: default (solid) vs round 6's v3 (dashed), "
         f"{runs[-1].get('device', '')}", str(args.out), styles, ticks=(2, 4, 8, 16, 32, 64))


if __name__ == "__main__":
    main()
