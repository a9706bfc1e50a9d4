"""Where a kernel's warps wait, from Nsight Compute's per-instruction CSV (``bench/ncu_gemv.sh`` writes it).

    python bench/ncu_stalls.py OUT/ncu_int4_4096x4096_r64_sass.csv [more.csv ...] [--top 14]

For each CSV: the stall reasons' shares of all warp samples, the instructions with the most samples (and their
three commonest reasons), and the opcode mix of the hot loop -- the instructions executed at least half as often
as the most executed one, i.e. the body of the kernel's main loop. Round 17 of the 4-bit kernels (BENCHMARKS.md)
read the wgmma GEMM this way: ``bench/results/ncu_wgmma_h200_round17_stalls.txt``.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV's header and its instruction rows (the first line names the kernel, the second is the header)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if len(lines) < 3 or SAMPLES not in lines[1]:
        raise SystemExit(f"{path}: not an 'ncu --page source --print-source sass --csv' export (no '{SAMPLES}' column)")
    header = lines[1]
    return header, [dict(zip(header, line)) for line in lines[2:] if len(line) >= len(header)]


def as_int(text: str) -> int:
    return int(text) if text.strip().lstrip("-").isdigit() else 0


def opcode(source: str) -> str:
    """``@!P0 LDG.E.128 R4, [R2]`` -> ``LDG``."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def report(path: Path, top: int) -> str:
    header, rows = read_rows(path)
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(as_int(r[SAMPLES]) for r in rows) or 1
    by_reason = Counter({s: sum(as_int(r[s]) for r in rows) for s in reasons})
    out = [f"{path.name}: {total} samples over {len(rows)} instructions"]
    out += [f"  {s:24s} {n / total:6.1%}" for s, n in by_reason.most_common(10) if n]
    out.append("  the most sampled instructions:")
    for r in sorted(rows, key=lambda r: -as_int(r[SAMPLES]))[:top]:
        why = Counter({s: as_int(r[s]) for s in reasons}).most_common(3)
        out.append(f"    {as_int(r[SAMPLES]) / total:5.1%}  {r['Source'].strip()[:64]:64s} "
                   + ", ".join(f"{s[6:]} {n}" for s, n in why if n))
    executed = [as_int(r[EXECUTED]) for r in rows]
    hot = [r for r, n in zip(rows, executed) if n >= 0.5 * max(executed, default=0) > 0]
    share = sum(as_int(r[EXECUTED]) for r in hot) / (sum(executed) or 1)
    mix = Counter(opcode(r["Source"]) for r in hot)
    out.append(f"  hot loop: {len(hot)} instructions, {share:.0%} of those executed; "
               + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=14, help="how many of the most sampled instructions to list")
    args = parser.parse_args()
    print("\n\n".join(report(path, args.top) for path in args.csv))


if __name__ == "__main__":
    main()
