#!/usr/bin/env bash
# Issue 6's GPU benchmarks, HF stack and holdall side by side, in one command on the device machine:
#
#   bash bench/run_all.sh [kernels] [decode] [qlora] [mma] [nf4] [wgmma]  (default: the first three, ~10 minutes on an H200)
#
# mma: the tensor-core GEMV (rounds 12-13) -- its device tests (pytest-xdist, ~5 minutes: each test compiles its
# own kernels), its one-row tilings with and without loads run ahead beside the Gluon GEMV and bf16
# (gluon_sweep_mma.json), and 2..64 rows beside the v3 GEMM, bf16 and the default (gemm_rows.json).
# nf4: NF4 / NF4 + double quant on the tensor-core GEMV (rounds 13-14) -- the device tests of its epilogues and
# the fused norm path, the one-row default beside the TMA GEMV it replaced (gluon_sweep_nf4*.json), 2..16 rows
# with int groups of 64 and double-quantized int scales beside them (gemm_rows_nf4.json: the tensor-core cells
# say whether those leave v3 too), and the NF4 + DQ decode with and without the Gluon kernels (HOLDALL_GLUON=0: round 8's
# TMA GEMVs), each a separate process in the same call (gpu_decode_nf4*.json).
# wgmma: the warpgroup-MMA GEMM (rounds 15-16) -- its device tests and the dispatch through it (~2 minutes), then 24,
# 33 and 64 rows of int4 / NF4 / NF4 + DQ on the five Llama-2-7B shapes: v3, bf16, the default (which picks it) and
# the alternatives of each staging, TMA with and without padding (gemm_rows_wgmma.json).
#
# The bitsandbytes wheel (and any other missing package) travels in .whl/ (the device README says how); it is
# installed into /tmp/site for this run. Results go to $OUT (default bench/results): gpu_kernels.json,
# gpu_decode.json, qlora_step.json, each with its log; every script prints its ratios against the HF stack.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(kernels decode qlora)
for part in "${parts[@]}"; do
  case "$part" in kernels|decode|qlora|mma|nf4|wgmma) ;; *) echo "unknown part '$part': choose from kernels, decode, qlora, mma, nf4, wgmma" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
for part in "${parts[@]}"; do
  case "$part" in
    kernels) python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.log"
             python3 bench/gluon_sweep.py --out "$OUT/gluon_sweep.json" 2>&1 | tee "$OUT/gluon_sweep.log"
             python3 bench/gluon_sweep.py --int8 --out "$OUT/gluon_sweep_int8.json" 2>&1 | tee "$OUT/gluon_sweep_int8.log" ;;
    mma) python3 -m pytest -q -n 15 -p xdist -p no:benchmark tests/test_kernels.py -k "tensor_core or a_few_rows" 2>&1 \
           | tee "$OUT/mma_tests.log" || echo "mma tests FAILED (see mma_tests.log); the sweeps still run"
         python3 bench/gluon_sweep.py --tilings 8x2,8x4 --modes pdl-t0,pdl-t2 --mma 1x4,1x8,1x4a2,1x8a3 \
           --out "$OUT/gluon_sweep_mma.json" 2>&1 | tee "$OUT/gluon_sweep_mma.log"
         python3 bench/gemm_rows.py --rows 2,4,8,16,64 --mma 1x4,1x8,1x8a3 --out "$OUT/gemm_rows.json" 2>&1 \
           | tee "$OUT/gemm_rows.log" ;;
    nf4) python3 -m pytest -q -n 15 -p xdist -p no:benchmark tests/test_kernels.py \
           -k "tensor_core_gemv_epilogues or splits_the_norm or folds_the_scale or takes_float_rows" 2>&1 \
           | tee "$OUT/nf4_tests.log" || echo "nf4 tests FAILED (see nf4_tests.log); the sweeps still run"
         for scheme in nf4 nf4-dq; do
           python3 bench/gluon_sweep.py --scheme $scheme --tilings "" --mma 1x4,1x8 --out "$OUT/gluon_sweep_$scheme.json" \
             2>&1 | tee "$OUT/gluon_sweep_$scheme.log"
         done
         python3 bench/gemm_rows.py --schemes nf4,nf4-dq,int4-g64-sym,int4-g128-sym-dq --rows 2,8,16 --mma 1x4,1x8 \
           --out "$OUT/gemm_rows_nf4.json" 2>&1 \
           | tee "$OUT/gemm_rows_nf4.log"
         python3 bench/gpu_decode.py --schemes nf4-dq --skip-hf --skip-bf16 --new-tokens 128 \
           --out "$OUT/gpu_decode_nf4.json" 2>&1 | tee "$OUT/gpu_decode_nf4.log"
         HOLDALL_GLUON=0 python3 bench/gpu_decode.py --schemes nf4-dq --skip-hf --skip-bf16 --new-tokens 128 \
           --out "$OUT/gpu_decode_nf4_tma.json" 2>&1 | tee "$OUT/gpu_decode_nf4_tma.log" ;;
    wgmma) python3 -m pytest -q -n 15 -p xdist -p no:benchmark tests/test_kernels.py -k "wgmma or many_rows_take" \
             2>&1 | tail -20 | tee "$OUT/wgmma_tests.log" || echo "wgmma tests FAILED (see wgmma_tests.log); the sweep still runs"
           python3 bench/gemm_rows.py --shapes 4096x11008,11008x4096,4096x4096,12288x4096,22016x4096 \
             --schemes int4-g128-sym,nf4,nf4-dq --rows 24,33,64 --mma "" --wgmma wg1s4,wg1s2ta3,wg1s2ta3p,wg1s1ta3,wg1s1ta3p \
             --out "$OUT/gemm_rows_wgmma.json" 2>&1 | tee "$OUT/gemm_rows_wgmma.log" ;;
    decode) python3 bench/gpu_decode.py --out "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.log" ;;
    qlora) python3 bench/gpu_qlora_step.py --layers 32 --steps 5 --warmup 3 \
             --configs hf,holdall-graphs-offload,holdall-graphs --out "$OUT" 2>&1 | tee "$OUT/qlora_step.log" ;;
  esac
done
