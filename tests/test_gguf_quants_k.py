"""Q2_K / Q4_K / Q5_K: holdall's encoders byte for byte against libggml's quantizer, decoders against gguf-py.

The reference bytes come from ``ggml_quantize_chunk`` in llama-cpp-python's libggml (tests/ggml_ref.py), with and
without an importance matrix; the reference decode is ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from ggml_ref import ggml_quantize, require_ggml

from holdall.formats.gguf import quants, quants_k

K_TYPES = ["Q2_K", "Q4_K", "Q5_K"]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _blocky(rng, n_rows, n_per_row, fill):
    """Normal rows whose super-blocks / sub-blocks are overwritten by ``fill(view)`` in place."""
    x = rng.standard_normal((n_rows, n_per_row)).astype(np.float32)
    fill(x.reshape(n_rows, -1, 256))
    return x


def _zero_parts(b):
    b[0, 1] = 0  # a whole super-block
    b[1, :, :16] = 0  # the first Q2_K sub-block of every super-block
    b[1, :, 32:64] = 0  # a Q4_K/Q5_K sub-block
    b[2] = 0  # a whole row


def _constants(b):
    b[0] = 0.75
    b[1] = -1.5
    b[2, :, :32] = 3.0  # constant sub-blocks inside otherwise random blocks
    b[2, :, 64:80] = -2.0


def _signed(b):
    b[0] = np.abs(b[0]) + 0.01  # all positive: min pinned at 0
    b[1] = -np.abs(b[1])  # all negative
    b[2] = np.minimum(b[2], 0)  # non-positive with exact zeros
    b[3] = np.maximum(b[3], 0)


def _case(name: str) -> np.ndarray:
    """The float32 rows [n_rows, n_per_row] of one named test case."""
    rng = _rng(name)
    normal = lambda r, n: rng.standard_normal((r, n)).astype(np.float32)  # noqa: E731
    if name.startswith("normal"):  # normal_<n_per_row>_<seed>
        _, n, seed = name.split("_")
        n = int(n)
        return np.random.default_rng(int(seed)).standard_normal((max(2, 4096 // n), n)).astype(np.float32)
    if name == "outliers":
        x = normal(4, 4096)
        x[rng.random(x.shape) < 0.003] *= 80
        return x
    if name == "student_t3":
        return rng.standard_t(3, (8, 1024)).astype(np.float32)
    if name == "cauchy":
        return rng.standard_t(1, (8, 1024)).astype(np.float32)
    if name == "zeros":
        return _blocky(rng, 4, 1024, _zero_parts)
    if name == "constant":
        return _blocky(rng, 3, 512, _constants)
    if name == "signed":
        return _blocky(rng, 4, 512, _signed)
    if name == "tiny":
        return normal(4, 1024) * np.float32(1e-6)  # fp16 d/dmin become subnormal or 0
    if name == "sparse":  # mostly exact zeros: sub-blocks whose fit pins the min at max
        x = normal(8, 1024)
        x[rng.random(x.shape) > 0.1] = 0
        return x
    if name == "f16_grid":  # llama-quantize reads F16 checkpoints: values on the fp16 grid
        return (normal(4, 1024) * np.float32(0.02)).astype(np.float16).astype(np.float32)
    raise KeyError(name)


CASES = ["normal_256_0", "normal_256_1", "normal_512_2", "normal_4096_3", "normal_4096_4", "outliers",
         "student_t3", "cauchy", "zeros", "constant", "signed", "tiny", "sparse", "f16_grid"]
IMATRICES = ["none", "positive", "with_zeros"]


def _imatrix(kind: str, n_per_row: int) -> np.ndarray | None:
    rng = np.random.default_rng(n_per_row)
    if kind == "none":
        return None
    values = (rng.random(n_per_row) * 2 + 0.01).astype(np.float32)
    if kind == "with_zeros":
        values[rng.random(n_per_row) < 0.4] = 0
        values[:32] = 0  # a whole Q4_K sub-block without importance
    return values


def _reference(rows, name, imatrix):
    type_id, _, _ = quants.TYPES[name]
    return ggml_quantize(rows, type_id, quants.row_bytes(name, rows.shape[1]), imatrix)


@pytest.fixture(scope="module", autouse=True)
def _ggml():
    require_ggml()


@pytest.mark.parametrize("imatrix_kind", IMATRICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", K_TYPES)
def test_encoder_matches_libggml(name, case, imatrix_kind):
    rows = _case(case)
    imatrix = _imatrix(imatrix_kind, rows.shape[1])
    got = quants.ENCODERS[name](rows, imatrix)
    want = _reference(rows, name, imatrix)
    assert got.dtype == np.uint8 and got.shape == want.shape
    type_size = quants.TYPES[name][2]
    bad = np.flatnonzero((got.reshape(-1, type_size) != want.reshape(-1, type_size)).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {want.size // type_size} blocks differ, first: {bad[:8]}"


def test_overflowing_nearest_int_reproduced():
    """A super-block (reduced from a sparse tensor) where make_qkx3_quants' running min lands a rounding error
    below max = 0, so iscale·(x − min) for x = −1.27 is far beyond ±2**22 and C's nearest_int returns a
    value that clamps to 15 rather than 0: np.rint alone would give another qs byte."""
    x = np.zeros(256, np.float32)
    x[32 + np.array([8, 9, 15, 22])] = [0.76361567, 0.9985117, 1.298151, -0.3339182]
    x[96 + np.array([2, 4, 5])] = [-0.0015722422, -1.2655154, -0.14353175]
    imatrix = np.ones(256, np.float32)
    imatrix[32 + np.array([0, 1, 2, 5, 6, 8, 10, 13, 14, 17, 19, 25, 26, 30])] = 0
    imatrix[96:128] = [0.64385587, 0.38920832, 0.058396854, 0, 0, 0, 0.53687483, 0, 0.71146417, 0.24248101,
                       0.5811066, 0, 0, 0.5490855, 0, 0.43560895, 0.7600151, 0.81476885, 0.7654114, 0.21584073,
                       0, 0.4219476, 0, 0, 0, 0, 0.7371058, 0, 0.45654657, 0.5313507, 0.51590466, 0]
    got = quants.ENCODERS["Q4_K"](x[None], imatrix)
    want = _reference(x[None], "Q4_K", imatrix)
    np.testing.assert_array_equal(got, want)
    # the weight at 96 + 4 sits in the high nibble of qs byte 32 + 4 (block offset 16 + 36)
    assert want[0, 52] >> 4 == 15


@pytest.mark.parametrize("name", K_TYPES)
def test_single_block_rows(name):
    """One super-block per chunk takes the explicit-loop branch of the sequential sums."""
    rows = _case("normal_256_1")[:1]
    for imatrix in (None, _imatrix("positive", 256)):
        np.testing.assert_array_equal(quants.ENCODERS[name](rows, imatrix), _reference(rows, name, imatrix))


@pytest.mark.parametrize("name", K_TYPES)
def test_chunk_boundaries_keep_imatrix_alignment(name, monkeypatch):
    """Chunks that start mid-row must still pair each super-block with its own importance slice."""
    monkeypatch.setattr(quants_k, "_CHUNK", 3)
    rows = _case("normal_512_2")[:5]  # 10 super-blocks: chunks 3, 3, 3, 1 straddle rows
    imatrix = _imatrix("positive", 512)
    np.testing.assert_array_equal(quants.ENCODERS[name](rows, imatrix), _reference(rows, name, imatrix))


@pytest.mark.parametrize("name", K_TYPES)
def test_decoder_matches_gguf_on_arbitrary_bytes(name):
    """Every bit pattern (scales above 63, both nibbles, qh bits) decodes like gguf-py."""
    rng = np.random.default_rng(7)
    n_per_row = 1024
    raw = rng.integers(0, 256, (6, quants.row_bytes(name, n_per_row)), dtype=np.uint8)
    blocks = raw.reshape(-1, quants.TYPES[name][2])
    # d and dmin: finite fp16 values, so that the comparison is about the decode, not NaN arithmetic
    offsets = (80, 82) if name == "Q2_K" else (0, 2)
    for off in offsets:
        blocks[:, off:off + 2] = rng.standard_normal(blocks.shape[0]).astype("<f2").view(np.uint8).reshape(-1, 2)
    got = quants.DECODERS[name](raw, n_per_row)
    want = gguf_dequantize(raw, GGMLQuantizationType[name])
    assert got.dtype == np.float32 and got.shape == (6, n_per_row)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("case", ["normal_4096_3", "outliers", "zeros", "signed"])
def test_round_trip_through_public_api(name, case):
    rows = _case(case)
    raw = quants.quantize(rows, name)
    decoded = quants.dequantize(raw, name, rows.shape[1])
    np.testing.assert_array_equal(decoded, gguf_dequantize(raw, GGMLQuantizationType[name]))
    # and the codec is a quantizer, not noise: well within the range of each row
    err = np.abs(decoded - rows).max(axis=1)
    assert (err <= 0.5 * (rows.max(axis=1) - np.minimum(rows.min(axis=1), 0)) + 1e-6).all()


def test_registered():
    for name in K_TYPES:
        assert quants.ENCODERS[name].__module__ == quants_k.__name__
        assert quants.DECODERS[name].__module__ == quants_k.__name__
