"""Tokens/s of every decode path in one ``bench/gpu_decode.py`` run, as bars with the % of the copy-bandwidth
roofline on each, HF ``generate`` beside them (same process).

    python bench/plot_decode.py bench/results/gpu_decode_h200_round9_final.json \\
        --out bench/results/gpu_decode_h200_round9.png

Runs on any machine (matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: path -> bar label, in the order the bars are drawn (paths a run does not have are skipped)
PATHS = {
    "hf-generate": "HF generate",
    "static-unfused": "static, round 5's step",
    "static-norms-separate": "norms separate",
    "static-silu-separate": "SiLU x up separate",
    "static": "static (default)",
    "static-int8-act-norms-separate": "int8 act, norms separate",
    "static-int8-act-silu-separate": "int8 act, SiLU x up separate",
    "static-int8-act-no-handoff": "int8 act, no handoff",
    "static-int8-act": "int8 act (default)",
}


def bars(rows: list[dict]) -> list[tuple[str, float, float]]:
    """``(label, tokens/s, % of roofline)`` per (weights, path), weights in run order, paths in ``PATHS`` order."""
    out = []
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    for w in weights:
        mine = {r["path"]: r for r in rows if r["weights"] == w}
        for path, label in PATHS.items():
            if path in mine:
                out.append((f"{w}: {label}", mine[path]["tokens_per_s"], mine[path]["roofline_pct"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.run.read_text())
    items = bars(data["rows"])
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(items) + 1.2))
    labels = [label for label, _, _ in items]
    speeds = [tps for _, tps, _ in items]
    colors = ["#999999" if "HF" in label else ("#1f77b4" if label.startswith("bf16") else "#d62728")
              for label in labels]
    ax.barh(range(len(items)), speeds, color=colors)
    for i, (_, tps, pct) in enumerate(items):
        ax.text(tps, i, f" {tps:.0f} ({pct:.1f}%)", va="center", fontsize=8)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (batch 1; % of the copy-bandwidth roofline in brackets)")
    info = data["info"]
    ax.set_title(f"Llama-2-7B-shape decode, {info['device']}, {info['date']} "
                 f"(copy {info['copy_GBps']:.0f} GB/s)", fontsize=9)
    ax.set_xlim(0, max(speeds) * 1.25)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
