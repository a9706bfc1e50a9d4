"""The GGUF export's fast paths must not change a byte: the float16 rounding of float32 weights (llama-quantize
reads an F16 GGUF) against numpy's own casts, the metadata-array packing against gguf-py's GGUFWriter, and Q3_K's
blocked, pooled search (make_q3_quants) against libggml on a tensor large enough to use several blocks and chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from holdall.formats.gguf.export import _through_float16, _writer_class

F16_MAX_BITS = int(np.float32(65504).view(np.uint32))


def _numpy_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_float16_rounding_equals_numpys_casts():
    rng = np.random.default_rng(0)
    # every float32 in float16's range up to a stride, both signs (an exhaustive run over all of them agreed)
    bits = np.arange(0, F16_MAX_BITS + 1, 4099, dtype=np.uint32)
    # the rounding-critical patterns: float16 halfway points (bit 12 set, below it 0 or not) in every binade,
    # including float16's subnormal range, where the step is 2**-24 and not a bit count
    exps = np.arange(0x33, 0x48, dtype=np.uint32) << 23
    tails = np.array([0x1000, 0x1001, 0x0FFF, 0x3000, 0x2000, 0x7FF000, 0x7FFFFF, 0x7FE000], dtype=np.uint32)
    mant = (rng.integers(0, 1 << 10, 64, dtype=np.uint32) << 13)
    near = (exps[:, None, None] | mant[None, :, None] | tails[None, None, :]).reshape(-1)
    pool = np.concatenate([bits, near[near <= F16_MAX_BITS], np.uint32([0, 1, 0x387FFFFF, 0x38800000, 0x33000000,
                                                                      0x33000001, F16_MAX_BITS])])
    x = np.concatenate([pool, pool | np.uint32(0x80000000)]).view(np.float32)
    _same_bits(_through_float16(x), _numpy_f16(x))
    w = (rng.standard_normal((64, 300)) * 0.02).astype(np.float32)
    before = w.copy()
    _same_bits(_through_float16(w), _numpy_f16(w))
    _same_bits(w, before)  # the input (possibly the model's own memory) is left alone
    f = np.asfortranarray(w)[:, 3:250]  # any layout
    _same_bits(_through_float16(f), _numpy_f16(f))


def _kv_bytes(cls, path, arrays: dict) -> bytes:
    writer = cls(str(path), "llama")
    for key, values in arrays.items():
        writer.add_array(key, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


def test_metadata_arrays_are_packed_as_gguf_py_packs_them(tmp_path):
    gguf = pytest.importorskip("gguf")
    fast = _writer_class(gguf)
    assert fast is not gguf.GGUFWriter and issubclass(fast, gguf.GGUFWriter)
    rng = np.random.default_rng(1)
    arrays = {
        "tokenizer.ggml.tokens": ["<s>", "é€😀", "", " the", "\n"] + [f"t{i}" for i in range(500)],
        "tokenizer.ggml.token_type": [1, 3, 6] + [int(v) for v in rng.integers(1, 7, 500)],
        "tokenizer.ggml.scores": [0.1, -0.0, 1e-45, 3.4e38, float("inf"), -1e30] + [float(v) for v in
                                                                                  rng.standard_normal(500)],
        "x.int_enums": list(gguf.TokenType)[:4],
        "x.int32_edges": [2**31 - 1, -(2**31), 0],
        "x.bools": [True, False, True],  # gguf-py's own path
        "x.mixed_numbers": [1.5, 2.5],
        "x.single": [7],
    }
    assert _kv_bytes(fast, tmp_path / "fast.gguf", arrays) == _kv_bytes(gguf.GGUFWriter, tmp_path / "ref.gguf",
                                                                        arrays)
    for bad in ([1, 2**40], [1.0, 1e39]):  # out of int32 / float32 range: gguf-py's error, not a silent wrap
        errors = []
        for cls in (gguf.GGUFWriter, fast):
            try:
                _kv_bytes(cls, tmp_path / "bad.gguf", {"x.bad": bad})
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - whatever gguf-py raises, the fast path must raise it too
                errors.append(type(error))
        assert errors[0] is not None and errors[0] == errors[1]


def test_q3_k_search_over_many_blocks_and_chunks_matches_libggml():
    from ggml_ref import ggml_quantize

    from holdall.formats.gguf import quants, quants_legacy

    rng = np.random.default_rng(2)
    # 600 x 4096: 153,600 sub-blocks (several of make_q3_quants' 16,384-column blocks) in two encoder chunks
    assert 600 * 4096 > quants_legacy.CHUNK_VALUES[("Q3_K", False)] > 16 * quants_legacy._Q3_BLOCK
    W = (rng.standard_t(4, (600, 4096)) * rng.uniform(0.005, 0.05, (600, 1))).astype(np.float32)
    W[7] = 0.0
    W[8, :256] = -np.abs(W[8, :256])
    W[9, 100] = 3.0
    W = W.astype(np.float16).astype(np.float32)
    want = ggml_quantize(W, quants.TYPES["Q3_K"][0], quants.row_bytes("Q3_K", 4096))
    np.testing.assert_array_equal(quants.quantize(W, "Q3_K"), want)
