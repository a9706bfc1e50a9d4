"""bench/memory_peak.py: the blocks alive at the allocator's peak, from a synthetic allocation trace."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from memory_peak import peak_blocks, peak_report  # noqa: E402


def _frame(file, line, name):
    return {"filename": file, "line": line, "name": name}


def _alloc(addr, size, site):
    return {"action": "alloc", "addr": addr, "size": size, "frames": [_frame("/usr/lib/torch/x.py", 1, "op"), site]}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


def test_peak_is_the_largest_running_total_and_lists_what_is_alive_then():
    weight = _frame("/repo/src/holdall/training/fast_step.py", 10, "stacked")
    logits = _frame("/repo/src/holdall/training/fast_step.py", 20, "lm_loss")
    trace = [
        _alloc(1, 100, weight), _alloc(2, 50, logits), _free(1, 100),   # 1000 + 150 = 1150, then 1050
        _alloc(3, 120, weight), _alloc(4, 30, logits),                  # 1050 + 150 = 1200: the peak
        {"action": "segment_alloc", "addr": 9, "size": 4096, "frames": []},  # not an allocation of a tensor
        _free(3, 120), _free(77, 40),                                   # 77: allocated before recording
    ]
    peak, sites = peak_blocks({"device_traces": [trace]}, base=1000)
    assert peak == 1200
    assert sites == {"before (allocated when recording started)": 1000, "fast_step.py:10 stacked": 120,
                     "fast_step.py:20 lm_loss": 80}
    report = peak_report({"device_traces": [trace]}, base=1000)
    assert report.splitlines()[1].endswith("before (allocated when recording started)")
    # the allocation at the peak is event 4 (the lm_loss one); only repository frames are named
    assert report.splitlines()[-1] == "the allocation that reached the peak: fast_step.py:20 lm_loss"


def test_blocks_from_before_the_recording_freed_before_the_peak_leave_the_base():
    site = _frame("/repo/bench/gpu_qlora_step.py", 5, "step")
    trace = [_free(77, 400), _alloc(1, 500, site)]
    peak, sites = peak_blocks({"device_traces": [trace]}, base=1000)
    assert peak == 1100
    assert sites["before (allocated when recording started)"] == 600


def test_a_snapshot_without_a_trace_is_refused_with_the_reason():
    import pytest

    with pytest.raises(ValueError, match="_record_memory_history"):
        peak_blocks({"device_traces": []}, base=0)
