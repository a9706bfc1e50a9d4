"""Weight-only 4-bit matmul kernels (Triton) for CUDA ``QuantLinear``s: int4 (sym/asym) and NF4/FP4 (with or
without double quantization), read straight from the packed buffers.

Layering: rank 2, above ``core`` (whose buffers and backend registry it uses) and below everything that runs
models. Nothing here imports Triton at import time; ``triton_wq4`` (the kernels) is imported on the first
launch.

How the kernels get used: ``core.backends`` loads this package the first time a ``QuantLinear`` runs on a
CUDA tensor and calls :func:`enable`, which registers the ``triton-wq4`` backend when Triton is installed.
From then on ``QuantLinear.forward`` on CUDA with a supported format, bf16/fp16 compute, no gradient and at
most 64 rows runs a kernel (1 row: GEMV, 2..64: GEMM); everything else keeps the reference path. Set
``HOLDALL_KERNELS=0`` to keep the reference path everywhere; ``core.backends.use_backend("reference")``
does the same inside a ``with`` block.
"""

from __future__ import annotations

import importlib.util

from .dispatch import BACKEND, GEMV_MAX_ROWS, MAX_ROWS, supports

__all__ = ["BACKEND", "GEMV_MAX_ROWS", "MAX_ROWS", "available", "disable", "enable", "supports"]


def available() -> bool:
    """True when Triton is installed (whether a CUDA device is present is the caller's question)."""
    return importlib.util.find_spec("triton") is not None


def enable(force: bool = False) -> bool:
    """Register the kernels' backend if Triton is installed (``force``: register anyway, for dispatch tests).

    Idempotent. Returns whether the backend is registered.
    """
    if not (force or available()):
        return False
    from .dispatch import register

    register()
    return True


def disable() -> None:
    """Remove the kernels' backend (the reference path runs everything again)."""
    from .dispatch import unregister

    unregister()
