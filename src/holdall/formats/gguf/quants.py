"""Encoders and decoders for llama.cpp's weight types: one dispatch point over the per-family modules.

Every encoder takes rows of float32 weights and returns the raw block bytes llama.cpp stores:

    encode(rows: np.ndarray float32 [n_rows, n_per_row], imatrix: np.ndarray float32 [n_per_row] | None)
        -> np.ndarray uint8 [n_rows, n_per_row // block_size * type_size]
    decode(raw: np.ndarray uint8 [n_rows, row_bytes], n_per_row: int) -> np.ndarray float32 [n_rows, n_per_row]

Without an importance matrix each encoder's bytes equal libggml's ``ggml_quantize_chunk`` (the ``_ref``
quantizers); with one, they equal llama.cpp's imatrix path for the same importances. The per-family modules
(``quants_legacy``: F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q6_K/Q3_K; ``quants_k``: Q2_K/Q4_K/Q5_K) register
themselves in ``ENCODERS`` / ``DECODERS`` on import.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import ConfigError, DataError

Encoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
Decoder = Callable[[np.ndarray, int], np.ndarray]

ENCODERS: dict[str, Encoder] = {}
DECODERS: dict[str, Decoder] = {}

# name -> (ggml type id, elements per block, bytes per block); ggml-common.h
TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
TYPE_BY_ID = {type_id: name for name, (type_id, _, _) in TYPES.items()}


def register(name: str, encode: Encoder, decode: Decoder) -> None:
    if name not in TYPES:
        raise ConfigError(f"unknown ggml type {name!r}; known: {', '.join(TYPES)}")
    ENCODERS[name] = encode
    DECODERS[name] = decode


def _load_families() -> None:
    # Imported lazily so this module (and its TYPES table) costs nothing until a tensor is encoded; each family
    # on its own, so that a broken k-quant module cannot take F16/Q8_0 down with it.
    import importlib

    for family in ("quants_legacy", "quants_k"):
        importlib.import_module(f"{__package__}.{family}")


def type_name(qtype) -> str:
    """Accept 'Q4_K', a gguf.GGMLQuantizationType or its integer id; return the canonical name."""
    if isinstance(qtype, str):
        name = qtype.upper()
    elif isinstance(qtype, int):  # GGMLQuantizationType is an IntEnum
        name = TYPE_BY_ID.get(int(qtype), str(qtype))
    else:
        name = str(qtype)
    if name not in TYPES:
        raise ConfigError(f"unsupported ggml type {qtype!r}; holdall encodes {', '.join(TYPES)}")
    return name


def row_bytes(qtype, n_per_row: int) -> int:
    _, block, size = TYPES[type_name(qtype)]
    return n_per_row // block * size


def check_row_length(qtype, n_per_row: int) -> None:
    name = type_name(qtype)
    block = TYPES[name][1]
    if n_per_row % block:
        raise ConfigError(
            f"{name} stores blocks of {block} values, but the rows have {n_per_row}; pick a type whose block "
            f"divides {n_per_row} (llama.cpp's file types fall back to a legacy 32-block type for such tensors)"
        )


def quantize(rows: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode ``rows`` (float32 ``[n_rows, n_per_row]``; 1-D is one row) into llama.cpp's block bytes."""
    name = type_name(qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2:
        raise DataError(f"quantize expects rows [n_rows, n_per_row], got shape {list(rows.shape)}")
    check_row_length(name, rows.shape[1])
    if not np.isfinite(rows).all():
        raise DataError(f"cannot encode {name}: the tensor holds NaN or Inf values")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != rows.shape[1]:
            raise DataError(f"the importance vector has {imatrix.shape[0]} entries, the rows have {rows.shape[1]}")
    _load_families()
    return ENCODERS[name](rows, imatrix)


def dequantize(raw: np.ndarray, qtype, n_per_row: int) -> np.ndarray:
    """Decode llama.cpp block bytes ``[n_rows, row_bytes]`` back to float32 ``[n_rows, n_per_row]``."""
    name = type_name(qtype)
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    raw = raw.reshape(-1, row_bytes(name, n_per_row))
    _load_families()
    return DECODERS[name](raw, n_per_row)
