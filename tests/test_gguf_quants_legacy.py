"""F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q3_K: holdall's encoders byte for byte against libggml.

The reference bytes come from ``ggml_quantize_chunk`` in llama-cpp-python's libggml (tests/ggml_ref.py), without
an importance matrix (the ``quantize_row_*_ref`` quantizers) and with one (llama.cpp's ``quantize_row_*_impl``);
the reference decode is ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from ggml_ref import ggml_quantize, require_ggml

from holdall.formats.gguf import quants, quants_legacy

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q3_K"]
IMATRIX_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q3_K"]  # the others ignore the importances
K_TYPES = ("Q6_K", "Q3_K")


def _row_lengths(name: str) -> list[int]:
    """Row lengths to try: 576 (not a multiple of 256) only for the 32-value and float types."""
    return [256, 4096] if name in K_TYPES else [576, 4096]


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, str(k))) for k in key])


def _normal(rng, n_rows, n):
    return rng.standard_normal((n_rows, n)).astype(np.float32)


def _case(case: str, n: int) -> np.ndarray:
    """The float32 rows [n_rows, n] of one named case (n a multiple of 256 or of 32)."""
    rng = _rng(case, n)
    rows = max(2, 16384 // n)
    if case.startswith("normal"):  # several seeds
        return _normal(rng, rows, n)
    if case == "outliers":  # a few huge values per row
        x = _normal(rng, rows, n)
        x[rng.random(x.shape) < 0.004] *= 1000
        x[0, 7] = 3e4
        return x
    if case == "zeros":  # all-zero blocks and sub-blocks, a zero row, -0.0 blocks
        x = _normal(rng, 4, n)
        x[0, :64] = 0
        x[1, 16:48] = 0
        x[2] = 0
        x[3, :32] = -0.0
        return x
    if case == "constant":  # constant rows and constant blocks
        x = np.empty((4, n), np.float32)
        x[0], x[1], x[2] = 0.75, -1.5, 1e-3
        x[3] = _normal(rng, 1, n)
        x[3, 32:64] = -2.0
        return x
    if case == "tiny":  # ~1e-30: fine in fp32, scales underflow fp16
        return _normal(rng, rows, n) * np.float32(1e-30)
    if case == "subnormal":  # subnormal floats: 1/d overflows, the C casts see inf and NaN
        x = _normal(rng, 4, n) * np.float32(1e-40)
        x[1] = rng.choice(np.array([0, 1e-45, -1e-45, 4e-45, -1.4e-44, 1e-38], np.float32), n)
        return x
    if case == "negative_max":  # mixed-sign blocks whose largest magnitude is negative, and +a/-a ties
        x = _normal(rng, rows, n)
        x[:, ::16] = -4.0
        x[1, 5::32] = 4.0  # the same magnitude after the negative one in half of the blocks
        x[2, 1::32] = 4.0  # ... and before it in others
        return x
    if case == "grid":  # values on a coarse grid: many exact rounding ties
        return (rng.integers(-16, 17, (rows, n)) * 0.25).astype(np.float32)
    if case == "f16_values":  # llama-quantize reads F16 checkpoints: values on the fp16 grid
        return _normal(rng, rows, n).astype(np.float16).astype(np.float32)
    if case == "weights":  # a realistic layer: per-row scales, a few strong input channels
        x = _normal(rng, rows, n) / np.float32(np.sqrt(n))
        x *= np.exp(rng.normal(0, 0.5, (rows, 1))).astype(np.float32)
        x[:, rng.choice(n, 3, replace=False)] *= 20
        return x
    raise KeyError(case)


CASES = ["normal_0", "normal_1", "normal_2", "outliers", "zeros", "constant", "tiny", "subnormal",
         "negative_max", "grid", "f16_values", "weights"]


def _imatrix(kind: str, n: int) -> np.ndarray:
    rng = _rng(kind, n)
    if kind == "random":
        return (rng.random(n) ** 2 + 1e-3).astype(np.float32)
    if kind == "with_zeros":
        qw = rng.lognormal(0, 2, n).astype(np.float32)
        qw[rng.random(n) < 0.3] = 0
        qw[:32] = 0  # a block without any importance
        return qw
    raise KeyError(kind)


def _assert_same_bytes(name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    type_id, _, type_size = quants.TYPES[name]
    want = ggml_quantize(x, type_id, quants.row_bytes(name, x.shape[1]), imatrix)
    got = quants.quantize(x, name, imatrix)
    assert got.dtype == np.uint8 and got.shape == want.shape
    if not np.array_equal(got, want):
        bad = np.nonzero((got != want).reshape(-1, type_size).any(axis=1))[0]
        raise AssertionError(f"{name}: {bad.size} of {want.size // type_size} blocks differ, first {bad[:8]}")
    return got


@pytest.fixture(autouse=True)
def _libggml():
    require_ggml()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_libggml(name, case):
    for n in _row_lengths(name):
        _assert_same_bytes(name, _case(case, n))


@pytest.mark.parametrize("kind", ["random", "with_zeros"])
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_libggml_with_imatrix(name, kind):
    cases = ["normal_0", "weights", "outliers", "zeros", "negative_max", "tiny"]
    if name not in IMATRIX_TYPES:
        cases = cases[:2]  # the importances must simply be ignored, as libggml does
    for n in _row_lengths(name):
        for case in cases:
            _assert_same_bytes(name, _case(case, n), _imatrix(kind, n))


def test_k_quants_with_extreme_importances_match_libggml():
    # importances around 1e30 overflow the weighted sums to inf/NaN: C's comparisons then decide oddly
    rng = _rng("extreme")
    x = _normal(rng, 4, 512) * np.float32(1e6)
    qw = (rng.random(512) * 1e30).astype(np.float32)
    for name in IMATRIX_TYPES:
        _assert_same_bytes(name, x, qw)


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K"])
def test_k_quants_huge_values_match_libggml(name):
    # |x| beyond 1e13 overflows x^3 (the weights are x^2): NaN scales must be skipped like C's comparisons do
    x = _normal(_rng("huge", name), 4, 512) * np.float32(1e18)
    _assert_same_bytes(name, x)


def test_bf16_nan_and_inf_match_libggml():
    # the dispatcher rejects NaN, so call the encoder directly: ggml keeps NaN and forces it quiet
    x = _normal(_rng("bf16"), 2, 64)
    bits = x.view(np.uint32)
    bits[0, :4] = [0x7F800001, 0xFFC00000, 0x7FBFFFFF, 0x7F800000]  # signalling NaN, -qNaN, NaN, +inf
    x[1, :2] = [3.4e38, -3.4e38]  # rounds to +-inf
    want = ggml_quantize(x, quants.TYPES["BF16"][0], quants.row_bytes("BF16", 64))
    np.testing.assert_array_equal(quants.ENCODERS["BF16"](x, None), want)


@pytest.mark.parametrize("name", TYPES)
def test_decode_matches_gguf_dequantize(name):
    x = _case("outliers", _row_lengths(name)[0])
    raw = quants.quantize(x, name)
    got = quants.dequantize(raw, name, x.shape[1])
    want = gguf_dequantize(raw, GGMLQuantizationType[name]).reshape(got.shape)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", TYPES)
def test_decode_of_arbitrary_bytes_matches_gguf_dequantize(name):
    # every bit pattern of the level fields, with finite fp16 scales so both sides compare without NaN
    n = _row_lengths(name)[0]
    _, block, type_size = quants.TYPES[name]
    rng = _rng("bytes", name)
    raw = rng.integers(0, 256, (3, quants.row_bytes(name, n)), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    scale_offsets = {"Q4_1": [0, 2], "Q5_1": [0, 2], "Q6_K": [type_size - 2], "Q3_K": [type_size - 2]}
    if block > 1:
        for offset in scale_offsets.get(name, [0]):
            halves = rng.standard_normal(len(blocks)).astype("<f2")
            blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    elif name == "F16":
        raw[...] = rng.standard_normal(raw.size // 2).astype("<f2").view(np.uint8).reshape(raw.shape)
    got = quants.dequantize(raw, name, n)
    want = gguf_dequantize(raw, GGMLQuantizationType[name]).reshape(got.shape)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", TYPES)
def test_roundtrip_error_is_small(name):
    x = _case("normal_0", _row_lengths(name)[0])
    y = quants.dequantize(quants.quantize(x, name), name, x.shape[1])
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < {"F32": 1e-9, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.02, "Q5_0": 0.05,
                  "Q5_1": 0.05, "Q4_0": 0.12, "Q4_1": 0.1, "Q3_K": 0.2}[name]


def test_all_types_registered():
    for name in TYPES:
        assert quants.ENCODERS[name] is not None and quants.DECODERS[name] is not None


# ---- the C-arithmetic helpers, against their C definitions


def test_nearest_int_is_ggml_magic_number_rounding():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 4194303.0, 1e7, np.inf, np.nan], np.float32)
    with np.errstate(invalid="ignore"):
        got = quants_legacy.nearest_int(v)
    # halves to even; beyond 2**22 C returns the low mantissa bits of v + 1.5 * 2**23, minus 2**22
    magic = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal(got[:7], [0, 2, 2, 0, -2, 2, 4194303])
    np.testing.assert_array_equal(got, magic)


def test_c_roundf_takes_halves_away_from_zero():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 8388607.0], np.float32)
    np.testing.assert_array_equal(quants_legacy.c_roundf_int32(v), [1, 2, 3, -1, -3, 0, 0, 127, 8388607])


def test_seq_sum_adds_in_c_order():
    # 2**24 + 1 rounds back to 2**24 at every step in C's loop; a pairwise sum would keep the ones
    a = np.ones((32, 3), np.float32)
    a[0] = 2.0**24
    np.testing.assert_array_equal(quants_legacy.seq_sum(a), np.full(3, 2.0**24, np.float32))
    assert quants_legacy.seq_sum(np.full((2, 1), -0.0, np.float32))[0] == 0.0  # C's "float s = 0"
    assert np.signbit(quants_legacy.seq_sum(np.full((2, 1), -0.0, np.float32), from_zero=False)[0])


def test_q3_k_scale_packing_roundtrips():
    ls = _rng("scales").integers(0, 64, (5, 16)).astype(np.uint8)
    packed = quants_legacy.pack_q3_k_scales(ls)
    assert packed.shape == (5, 12)
    np.testing.assert_array_equal(quants_legacy.unpack_q3_k_scales(packed), ls)
