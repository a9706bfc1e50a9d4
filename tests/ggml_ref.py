"""libggml's own quantizer, called through ctypes: the independent reference for holdall's GGUF encoders.

llama-cpp-python ships libggml-base.so; its ``ggml_quantize_chunk`` is what ``llama-quantize`` runs per tensor.
Tests that need it call :func:`require_ggml`, which skips when llama-cpp-python is not installed, unless
``HOLDALL_REQUIRE_LLAMA_CPP=1`` (set by ``.ci/run``) turns the missing reference into a failure.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

_LIB = None


def require_ggml():
    """The loaded libggml-base (ctypes.CDLL) with ``ggml_quantize_chunk`` typed; skip or fail when absent."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("HOLDALL_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail("llama-cpp-python is required here (HOLDALL_REQUIRE_LLAMA_CPP=1) but is not installed")
        pytest.skip("llama-cpp-python is not installed (the libggml reference)")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    _LIB = lib
    return lib


def ggml_quantize(rows: np.ndarray, type_id: int, row_bytes: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """libggml's bytes for ``rows`` (float32 [n_rows, n_per_row]) as uint8 [n_rows, row_bytes]."""
    lib = require_ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        imat = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(type_id, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imat)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_dequantize(raw: np.ndarray, qtype: str, n_per_row: int) -> np.ndarray:
    """libggml's ``dequantize_row_<type>`` over all rows of ``raw`` (uint8 ``[n_rows, row_bytes]``):
    float32 ``[n_rows, n_per_row]``."""
    lib = require_ggml()
    fn = getattr(lib, f"dequantize_row_{qtype.lower().replace('_k', '_K')}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((raw.shape[0], n_per_row), dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def f16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian float16 at byte ``at`` of every block row, as float32 ``[n]``."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(np.float32).reshape(-1)
