"""Speed-up over bf16 cuBLAS against batch size, one panel per weight shape, from ``bench/gpu_kernels.py`` output.

    python bench/plot_kernels.py bench/results/gpu_kernels_h200_round4.json \\
        --override bench/results/gpu_kernels_h200_round4_nf4_default.json \\
        --out bench/results/gpu_kernels_h200_round4.png

``--override``: a later run whose (shape, batch, impl) cells replace the first file's (e.g. a run after one more
default changed); every ratio is against the bf16 time of the run it came from. Runs on any machine (matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPLS = {  # impl -> legend label
    "holdall-int4-g128-sym": "holdall int4 g128 sym",
    "holdall-int4-g128-sym-int8act": "holdall int4 g128 sym, int8 activations (1 row)",
    "holdall-int4-g128-asym": "holdall int4 g128 asym",
    "holdall-nf4": "holdall NF4",
    "holdall-nf4-dq": "holdall NF4 + DQ",
    "bnb-nf4-dq": "bitsandbytes NF4 + DQ",
}


def load_cells(paths: list[str]) -> tuple[dict, dict]:
    """``{(shape, batch, impl): speed-up over bf16}`` with later files overriding earlier ones, and the first
    file's ``info``."""
    cells, info = {}, None
    for path in paths:
        data = json.loads(Path(path).read_text())
        info = info or data["info"]
        for row in data["rows"]:
            if row["impl"] in IMPLS:
                cells[(row["shape"], row["batch"], row["impl"])] = row["speedup_vs_bf16"]
    return cells, info


def plot(cells: dict, labels: dict, title: str, out: str, styles: dict | None = None,
         ticks: tuple[int, ...] = (1, 4, 16, 64)) -> None:
    """One panel per weight shape of ``cells`` ``{(shape, rows, key): speed-up over bf16}``, a line per ``key`` of
    ``labels`` (its legend label; ``styles``: its line style, default solid), bf16 at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({k[0] for k in cells}, key=lambda s: [int(v) for v in s.split("x")], reverse=True)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for key, label in labels.items():
            points = sorted((b, v) for (s, b, i), v in cells.items() if s == shape and i == key)
            if points:
                ax.plot([b for b, _ in points], [v for _, v in points], (styles or {}).get(key, "-"), marker="o",
                        label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.set_title(f"weight {shape} [out x in]")
        ax.set_xlabel("rows (tokens) per call")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over bf16 cuBLAS (higher is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="bench/gpu_kernels.py output")
    parser.add_argument("--override", action="append", default=[], help="a later run whose cells replace these")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    cells, info = load_cells([args.json, *args.override])
    if not cells:
        raise SystemExit(f"{args.json}: no rows of {', '.join(IMPLS)}")
    plot(cells, IMPLS, f"4-bit weight-only matmul on {info['device']} ({info['date'][:10]}, CUDA-graph timing)",
         args.out)


if __name__ == "__main__":
    main()
