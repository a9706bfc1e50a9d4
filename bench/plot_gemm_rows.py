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
from pathlib import Path

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(path.read_text()) for path in args.runs]
    points = cells(runs)
    shapes = list(dict.fromkeys(shape for shape, _, _ in points))
    schemes = list(dict.fromkeys(scheme for _, scheme, _ in points))
    colors = dict(zip(schemes, ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for scheme in schemes:
            rows = sorted(r for s, f, r in points if s == shape and f == scheme)
            for kernel, style in (("default", "-"), ("v3", "--")):
                xs = [r for r in rows if kernel in points[shape, scheme, r]]
                if xs:
                    ax.plot(xs, [points[shape, scheme, r][kernel] for r in xs], style, marker="o", markersize=3,
                            color=colors[scheme], label=f"{scheme}, {kernel}")
        ax.axhline(1.0, color="#777777", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"[out x in] = {shape}", fontsize=9)
        ax.set_xlabel("activation rows")
    axes[0][0].set_ylabel("speed-up over bf16 cuBLAS")
    axes[0][-1].legend(fontsize=7)
    device = runs[-1].get("device", "")
    fig.suptitle(f"4-bit GEMM, 2..64 rows: default (solid) vs round 6's v3 (dashed), {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
