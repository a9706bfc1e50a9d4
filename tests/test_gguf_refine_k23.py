"""formats.gguf.refine for the 2- and 3-bit k-quants Q2_K and Q3_K: error feedback inside their block formats.

Independent references, as in test_gguf_refine.py: every weight's grid is read out of the bytes here, from
ggml-common.h's layouts (block_q3_K: hmask[32] · qs[64] · scales[12] · d; block_q2_K: scales[16] · qs[64] · d ·
dmin), not through holdall's parsers; the weights are decoded by libggml's own ``dequantize_row_q{2,3}_K``
(ctypes, llama-cpp-python's libggml-base) as well as holdall's decoders; output errors are computed here in
float64 numpy from the decoded weights.
"""

from __future__ import annotations


import numpy as np
import pytest
from ggml_ref import f16_field, ggml_dequantize, ggml_quantize, require_ggml

from holdall.formats.gguf import quants, refine

TYPES = ["Q3_K", "Q2_K"]


# ------------------------------------------------------------------------------ independent references


def layout(raw: np.ndarray, qtype: str, n: int):
    """From the bytes, per weight: the grid ``weight = a·q + b`` (a, b float32 ``[n_rows, n]``), the stored code
    ``q`` (int ``[n_rows, n]``) and its range (lo, hi)."""
    n_rows = raw.shape[0]
    blocks = raw.reshape(-1, quants.TYPES[qtype][2]).astype(np.int64)
    nb = len(blocks)
    if qtype == "Q3_K":
        hmask, qs, s = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
        d = f16_field(raw.reshape(nb, -1), 108)
        sc = np.empty((nb, 16), np.int64)
        for j in range(16):  # dequantize_row_q3_K's kmask unpacking, one sub-block at a time
            low = s[:, j] & 0xF if j < 8 else s[:, j - 8] >> 4
            sc[:, j] = low | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
        code = np.empty((nb, 256), np.int64)
        for j in range(256):  # weight j: 128-half h, shift group k, lane l
            h, k, lane = j // 128, (j % 128) // 32, j % 32
            low2 = (qs[:, 32 * h + lane] >> (2 * k)) & 3
            high = (hmask[:, lane] >> (j // 32)) & 1
            code[:, j] = low2 | (high << 2)  # level + 4: dequantize gives d·(sc − 32)·(code − 4)
        a = np.repeat((d[:, None] * (sc - 32)).reshape(-1), 16)
        b = -4 * a
        lo, hi = 0, 7
    elif qtype == "Q2_K":
        s, qs = blocks[:, 0:16], blocks[:, 16:80]
        d, dmin = f16_field(raw.reshape(nb, -1), 80), f16_field(raw.reshape(nb, -1), 82)
        code = np.empty((nb, 256), np.int64)
        for j in range(256):
            h, k, lane = j // 128, (j % 128) // 32, j % 32
            code[:, j] = (qs[:, 32 * h + lane] >> (2 * k)) & 3
        a = np.repeat((d[:, None] * (s & 0xF)).reshape(-1), 16)
        b = -np.repeat((dmin[:, None] * (s >> 4)).reshape(-1), 16)
        lo, hi = 0, 3
    else:
        raise AssertionError(qtype)
    shape = (n_rows, n)
    return (a.reshape(shape).astype(np.float32), b.reshape(shape).astype(np.float32), code.reshape(shape), lo, hi)


def correlated_case(seed: int, n: int = 512, n_rows: int = 24):
    """Random weights and the Hessian mean xᵀx of strongly correlated inputs with a few loud channels."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * 0.25 + np.eye(n)
    x = rng.standard_normal((2048, n)) @ mix
    x[:, rng.choice(n, 6, replace=False)] *= 8.0
    H = (x.T @ x / len(x)).astype(np.float32)
    W = (rng.standard_normal((n_rows, n)) * 0.02).astype(np.float32)
    W[0, 5] = 0.4  # an outlier weight
    W[1] = 0.0  # an all-zero row
    W[2, :16] = 0.0  # an all-zero sub-block
    return W, H


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    E = W.astype(np.float64) - W_hat.astype(np.float64)
    return np.einsum("ri,ij,rj->r", E, H.astype(np.float64), E)


@pytest.fixture(autouse=True)
def _libggml():
    require_ggml()


# ------------------------------------------------------------------------------------------------ tests


def test_the_k_quants_are_refined():
    assert {"Q2_K", "Q3_K"} <= set(refine.REFINED_TYPES)


@pytest.mark.parametrize("qtype", TYPES)
def test_refined_bytes_decode_onto_the_grid_and_lower_the_output_error(qtype):
    W, H = correlated_case(11 + TYPES.index(qtype))
    result = refine.refine_tensor(W, qtype, H)
    raw = result.raw
    assert not result.notes
    assert raw.dtype == np.uint8 and raw.shape == (W.shape[0], quants.row_bytes(qtype, W.shape[1]))

    ours = quants.dequantize(raw, qtype, W.shape[1])
    theirs = ggml_dequantize(raw, qtype, W.shape[1])
    np.testing.assert_array_equal(ours, theirs)  # valid bytes: libggml reads what holdall meant

    a, b, code, lo, hi = layout(raw, qtype, W.shape[1])
    assert code.min() >= lo and code.max() <= hi
    np.testing.assert_allclose(theirs, a * code + b, rtol=1e-6, atol=1e-9)  # every weight on its block's grid
    live = a != 0
    q = (theirs.astype(np.float64) - b)[live] / a[live]
    assert np.abs(q - np.rint(q)).max() < 1e-3 and q.min() >= lo - 1e-3 and q.max() <= hi + 1e-3
    np.testing.assert_array_equal(theirs[1], 0)  # the all-zero row stays zero

    imatrix_raw = quants.quantize(W, qtype, np.diagonal(H).copy())
    plain = output_error(W, ggml_dequantize(imatrix_raw, qtype, W.shape[1]), H)
    refined = output_error(W, theirs, H)
    assert (refined <= plain * (1 + 1e-6) + 1e-12).all()  # row by row never worse than the imatrix encoder
    assert refined.sum() < 0.8 * plain.sum()  # and clearly better with correlated inputs
    assert sum(result.chosen.values()) == W.shape[0] and result.chosen["imatrix"] < W.shape[0] // 2
    assert refine.layer_error(W, raw, qtype, H) == pytest.approx(refined.sum(), rel=1e-5)
    assert result.errors["chosen"] == pytest.approx(refined.mean(), rel=1e-5)


@pytest.mark.parametrize("source", ["imatrix", "plain", "degenerate"])
@pytest.mark.parametrize("qtype", TYPES)
def test_parse_then_pack_gives_back_the_encoders_bytes(qtype, source):
    rng = np.random.default_rng(5)
    W = (rng.standard_normal((6, 768)) * 0.03).astype(np.float32)
    if source == "degenerate":
        W[0] = 0.0
        W[1, 256:512] = 0.0
        W[2, :16] = 1e-30
        W[3, 7] = 50.0
        W[4] = -np.abs(W[4])
    importance = None if source == "plain" else rng.uniform(0.1, 4, 768).astype(np.float32)
    raw = quants.quantize(W, qtype, importance)
    if importance is None:  # the plain encoder is libggml's own quantizer, byte for byte
        type_id, _, _ = quants.TYPES[qtype]
        np.testing.assert_array_equal(raw, ggml_quantize(W, type_id, raw.shape[1]))
    handler = refine._HANDLERS[qtype]
    state = handler.parse(raw, W.shape[0])
    _, _, code, _, _ = layout(raw, qtype, W.shape[1])
    np.testing.assert_array_equal(handler.pack(state, code), raw)
    # the handler's grid is the decoder's: a·(its codes) + b reproduces the decoded weights
    a, b = handler.grid(state)
    g = handler.group
    decoded = np.repeat(a, g, axis=1) * code + np.repeat(b, g, axis=1)
    np.testing.assert_allclose(decoded, ggml_dequantize(raw, qtype, W.shape[1]), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("qtype", TYPES)
def test_identity_hessian_gives_plain_rounding_on_the_same_scales(qtype):
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    start = quants.quantize(W, qtype, np.ones(512, np.float32))
    levels, raw = refine.feedback_codes(W, qtype, np.eye(512, dtype=np.float32), start)
    a, b, _, lo, hi = layout(start, qtype, 512)
    live = a != 0
    expected = np.clip(np.rint((W.astype(np.float64) - b) / np.where(live, a, 1)), lo, hi)
    np.testing.assert_array_equal(levels[live], expected[live])
    a2, b2, code2, _, _ = layout(raw, qtype, 512)
    np.testing.assert_array_equal(a2, a)  # the scale fields are the encoder's ...
    np.testing.assert_array_equal(b2, b)
    np.testing.assert_array_equal(code2, levels)  # ... and the codes are the ones chosen
    np.testing.assert_allclose(ggml_dequantize(raw, qtype, 512), a * levels + b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("qtype", TYPES)
def test_a_diagonal_hessian_is_never_worse_than_the_imatrix_encoder(qtype):
    rng = np.random.default_rng(21)
    W = (rng.standard_t(3, (16, 768)) * 0.02).astype(np.float32)
    diag = rng.uniform(0.5, 2.0, 768).astype(np.float32)
    for H in (np.eye(768, dtype=np.float32), np.diag(diag)):
        result = refine.refine_tensor(W, qtype, H)
        plain = output_error(W, ggml_dequantize(quants.quantize(W, qtype, np.diagonal(H).copy()), qtype, 768), H)
        refined = output_error(W, ggml_dequantize(result.raw, qtype, 768), H)
        assert (refined <= plain * (1 + 1e-6) + 1e-15).all()
        assert refined.sum() <= plain.sum()


@pytest.mark.parametrize("qtype", TYPES)
def test_refit_scales_fit_the_type_fields(qtype):
    """from_ls rounds any least-squares solution into the stored fields: Q3_K's signed 6-bit sub-scales under a
    signed fp16 d (the largest one maps to −32), Q2_K's 4-bit scales and mins (negative ones clipped to 0)."""
    handler = refine._HANDLERS[qtype]
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 32)) * 0.01).astype(np.float32)
    a[0, :16] = 0.0  # a super-block whose scales all vanish
    b = (rng.standard_normal((3, 32)) * 0.01).astype(np.float32)
    state = handler.from_ls({}, a, b if handler.n_params == 2 else None)
    q = np.zeros((3, 512), np.uint8)
    raw = handler.pack(state, q)
    ga, gb = handler.grid(handler.parse(raw, 3))
    ra, rb, _, _, _ = layout(raw, qtype, 512)
    np.testing.assert_array_equal(np.repeat(ga, 16, axis=1), ra)
    np.testing.assert_array_equal(np.repeat(gb, 16, axis=1), rb)
    assert (ga[0, :16] == 0).all()
    if qtype == "Q3_K":
        # the largest magnitude of each super-block is stored at −32 steps of d, the rest in proportion
        for r in range(1, 3):
            for s in range(2):
                want, got = a[r, 16 * s:16 * s + 16], ga[r, 16 * s:16 * s + 16]
                step = np.abs(want).max() / 32
                assert np.abs(got - want).max() <= 0.5 * step * 1.01 + 1e-9
    else:
        assert (ga >= 0).all() and (gb <= 0).all()
        pos = np.maximum(a, 0)
        for r in range(1, 3):
            for s in range(2):
                step = pos[r, 16 * s:16 * s + 16].max() / 15
                assert np.abs(ga[r, 16 * s:16 * s + 16] - pos[r, 16 * s:16 * s + 16]).max() <= 0.5 * step * 1.01


def test_refined_q2_k_file_runs_in_llama_cpp(tmp_path):
    from gguf_helpers import llama_model, read_gguf_fast, require_llama_cpp, tiny_llama

    from holdall.data import wikitext2
    from holdall.evaluation.text import load_text
    from holdall.formats.gguf.export import export_gguf
    from holdall.models import load_tokenizer

    require_llama_cpp()
    tok = load_tokenizer("smollm2")
    model = tiny_llama(hidden=256, layers=2, vocab=49152, intermediate=512, max_position=512)
    text = load_text(wikitext2("valid"))[:20000]
    common = dict(tokenizer=tok, calibration_text=text, calibration_chunks=2, progress=False)
    ours = export_gguf(model, tmp_path / "refined.gguf", "Q2_K", refine="gptq", **common)
    plain = export_gguf(model, tmp_path / "imatrix.gguf", "Q2_K", **common)
    _, a = read_gguf_fast(ours)
    _, b = read_gguf_fast(plain)
    assert {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}  # same types and shapes
    k_quants = {name: v[0] for name, v in a.items() if v[0] in TYPES and name.startswith("blk.")}
    assert set(k_quants.values()) == {"Q2_K", "Q3_K"}  # the file type's mix: both refined types are present
    assert all(a[name][2] != b[name][2] for name in k_quants)  # other codes in every k-quant linear
    llm = llama_model(ours)
    try:
        out = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert isinstance(out, str) and llm.n_tokens > 5
    finally:
        llm.close()
