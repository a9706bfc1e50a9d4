#!/usr/bin/env bash
# One command on a fresh machine: install holdall, then quantize SmolLM2-135M-Instruct to 4-bit
# (group 128) and compare it with the float model on WikiText-2 (perplexity, KL divergence, size).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
. .venv/bin/activate
holdall info smollm2
holdall quantize smollm2 --method rtn --bits 4 --group-size 128 -o out/smollm2-int4-g128 --force
holdall eval out/smollm2-int4-g128 --kld-vs smollm2 --seq-len 2048 --max-windows 4
