"""bench/ncu_stalls.py: stall shares, the most sampled instructions and the hot loop's opcodes from an ncu CSV."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from ncu_stalls import report  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "Instructions Executed", "stall_long_sb", "stall_wait", "stall_barrier", "stall_long_sb (Not Issued)"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["Kernel Name", "_gemm_wgmma_kernel"])
        out.writerow(HEADER)
        out.writerows(rows)


def test_shares_top_instructions_and_hot_loop(tmp_path):
    # 40 samples: long_sb 24 (60%), wait 10 (25%), barrier 6 (15%); the "Not Issued" column is not a reason
    rows = [["0x10", "LDC R1, c[0x0][0x28]", "2", "2", "128", "", "2", "", "99"],
            ["0x20", "@!P0 LDG.E.128 R4, desc[UR4][R2.64]", "4", "4", "8192", "4", "", "", "99"],
            ["0x30", "HADD2.F32 R6, -RZ, R4.H0_H0", "20", "20", "8192", "20", "", "", "99"],
            ["0x40", "IMAD.MOV.U32 R8, RZ, RZ, R9", "8", "8", "4096", "", "8", "", ""],
            ["0x50", "BAR.SYNC.DEFER_BLOCKING 0x0", "6", "6", "8192", "", "", "6", ""],
            ["0x60", "EXIT", "0", "0", "128", "", "", "", ""]]
    path = tmp_path / "k_sass.csv"
    _write(path, rows)
    text = report(path, top=2)
    lines = text.splitlines()
    assert lines[0] == "k_sass.csv: 40 samples over 6 instructions"
    assert lines[1].split() == ["stall_long_sb", "60.0%"]
    assert lines[2].split() == ["stall_wait", "25.0%"]
    assert lines[3].split() == ["stall_barrier", "15.0%"]
    assert "Not Issued" not in text
    top = [line for line in lines if line.startswith("    ")]
    assert len(top) == 2 and "HADD2.F32" in top[0] and "50.0%" in top[0] and "long_sb 20" in top[0]
    assert "IMAD.MOV.U32" in top[1] and "wait 8" in top[1]
    # hot loop: executed >= 4096 (half of 8192): LDG, HADD2, IMAD, BAR -> 28672 of 28928 executed
    assert lines[-1] == "  hot loop: 4 instructions, 99% of those executed; LDG 1, HADD2 1, IMAD 1, BAR 1"


def test_not_an_ncu_export(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(SystemExit, match="not an 'ncu --page source"):
        report(path, top=3)
