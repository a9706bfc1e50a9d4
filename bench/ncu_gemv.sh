#!/usr/bin/env bash
# Nsight Compute on one 4-bit layer's forward (bench/gemv_probe.py), on the device machine (Firecracker runtime):
#
#   [KERNEL=regex] [TAG=suffix] bash bench/ncu_gemv.sh OUT_DIR [FORMAT] [SHAPE] [--config JSON | --rows M]
#
# KERNEL (default gemv) picks the kernel profiled by name, e.g. KERNEL=gemm_wgmma with --rows 64; TAG is added to
# the file names. Writes OUT_DIR/ncu_<format>_<shape><TAG>.txt (speed of light, occupancy, warp stalls, scheduler,
# memory) and OUT_DIR/ncu_<format>_<shape><TAG>_sass.csv (per-SASS-instruction samples: where the warps wait), from
# a report of the 21st launch, then prints the report's headline numbers and bench/ncu_stalls.py's reading of the
# CSV. Clocks are left alone (--clock-control none), as the device's METHOD.md asks.
set -euo pipefail
out=$1; fmt=${2:-int4}; shape=${3:-4096x11008}; shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
mkdir -p "$out"
tag="${fmt}_${shape}${TAG:-}"
ncu --clock-control none --kernel-name "regex:${KERNEL:-gemv}" --launch-skip 20 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats --section SourceCounters \
    --import-source yes -o "$out/ncu_$tag" -f \
    python3 bench/gemv_probe.py --format "$fmt" --shape "$shape" "$@" > "$out/ncu_${tag}_run.txt" 2>&1
ncu --import "$out/ncu_$tag.ncu-rep" --page details > "$out/ncu_$tag.txt"
ncu --import "$out/ncu_$tag.ncu-rep" --page source --print-source sass --csv > "$out/ncu_${tag}_sass.csv" || true
grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Issued Warp|No Eligible|Registers Per|Stall" \
    "$out/ncu_$tag.txt" | head -40
python3 bench/ncu_stalls.py "$out/ncu_${tag}_sass.csv" || true
