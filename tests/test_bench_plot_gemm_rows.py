"""bench/plot_gemm_rows.py: the cells it plots from ``gemm_rows.py`` runs (later runs win, ratios per run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from plot_gemm_rows import cells  # noqa: E402


def _cell(rows, bf16, default, v3, scheme=None):
    cell = {"shape": "4096x4096", "rows": rows, "bf16": bf16, "default": {"us": default}, "v3": {"us": v3}}
    if scheme:
        cell["scheme"] = scheme
    return cell


def test_later_runs_replace_cells_and_each_ratio_uses_its_own_bf16():
    sweep = {"cells": [_cell(2, 13.0, 6.5, 8.0), _cell(64, 12.0, 16.0, 16.0)]}  # before --schemes: int4 sym
    confirm = {"cells": [_cell(2, 14.0, 7.0, 8.75, scheme="int4-g128-sym"), _cell(2, 13.0, 10.0, 13.0, "nf4")]}
    got = cells([sweep, confirm])
    assert got[("4096x4096", "int4-g128-sym", 2)] == {"default": 2.0, "v3": 1.6}  # the confirming run's
    assert got[("4096x4096", "int4-g128-sym", 64)] == {"default": 0.75, "v3": 0.75}  # only in the sweep
    assert got[("4096x4096", "nf4", 2)] == {"default": 1.3, "v3": 1.0}


def test_a_failed_config_is_left_out():
    run = {"cells": [{"shape": "4096x4096", "rows": 2, "bf16": 13.0, "default": {"us": 6.5},
                      "v3": {"error": "ValueError: ..."}}]}
    assert cells([run]) == {("4096x4096", "int4-g128-sym", 2): {"default": 2.0}}
