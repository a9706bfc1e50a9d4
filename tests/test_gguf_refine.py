"""formats.gguf.refine: error feedback inside the ggml block formats.

Independent references: the grid every weight must lie on is read out of the bytes here, from ggml-common.h's
layouts (not through holdall's parsers), and the weights are decoded by libggml's own ``dequantize_row_*``
(ctypes, llama-cpp-python's libggml-base) as well as holdall's decoders; the output error is computed here in
float64 numpy from the decoded weights.
"""

from __future__ import annotations


import numpy as np
import pytest
from ggml_ref import f16_field, ggml_dequantize
from gguf_helpers import llama_model, read_gguf_fast, require_llama_cpp, tiny_llama

from holdall.errors import ConfigError, DataError
from holdall.formats.gguf import quants, refine
from holdall.formats.gguf.export import export_gguf
from holdall.formats.gguf.imatrix import collect_statistics

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


# ------------------------------------------------------------------------------ independent references


def grid_of(raw: np.ndarray, qtype: str, n: int):
    """Per weight, the grid its block stores: (a, b, qmin, qmax) with weight = a·q + b for an integer q, read
    from ggml-common.h's byte layouts. a, b: float32 ``[n_rows, n]``."""
    n_rows = raw.shape[0]
    size = quants.TYPES[qtype][2]
    blocks = raw.reshape(-1, size)
    if qtype in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        d = f16_field(blocks, 0)
        m = f16_field(blocks, 2) if qtype.endswith("_1") else None
        zero = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16}.get(qtype, 0)
        lo, hi = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q5_0": (0, 31), "Q4_1": (0, 15), "Q5_1": (0, 31)}[qtype]
        a = np.repeat(d, 32)
        b = np.repeat(m, 32) if m is not None else -zero * a
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
        s = blocks[:, 4:16].astype(np.int32)
        sc, mn = np.empty((len(blocks), 8), np.int32), np.empty((len(blocks), 8), np.int32)
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
            else:
                sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
                mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
        a = np.repeat((d[:, None] * sc).reshape(-1), 32)
        b = -np.repeat((dmin[:, None] * mn).reshape(-1), 32)
        lo, hi = 0, (15 if qtype == "Q4_K" else 31)
    elif qtype == "Q6_K":
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        a = np.repeat((f16_field(blocks, 208)[:, None] * sc).reshape(-1), 16)
        b = -32 * a
        lo, hi = 0, 63
    else:
        raise AssertionError(qtype)
    return a.reshape(n_rows, n).astype(np.float32), b.reshape(n_rows, n).astype(np.float32), lo, hi


def correlated_case(seed: int, n: int = 512, n_rows: int = 24):
    """Random weights and the Hessian mean xᵀx of strongly correlated inputs with a few loud channels."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * 0.25 + np.eye(n)
    x = rng.standard_normal((2048, n)) @ mix
    x[:, rng.choice(n, 6, replace=False)] *= 8.0
    H = (x.T @ x / len(x)).astype(np.float32)
    W = (rng.standard_normal((n_rows, n)) * 0.02).astype(np.float32)
    W[0, 5] = 0.4  # an outlier weight
    return W, H


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    E = W.astype(np.float64) - W_hat.astype(np.float64)
    return np.einsum("ri,ij,rj->r", E, H.astype(np.float64), E)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("qtype", TYPES)
def test_refined_bytes_decode_onto_the_grid_and_lower_the_output_error(qtype):
    W, H = correlated_case(TYPES.index(qtype))
    result = refine.refine_tensor(W, qtype, H)
    raw = result.raw
    assert raw.dtype == np.uint8 and raw.shape == (W.shape[0], quants.row_bytes(qtype, W.shape[1]))

    ours = quants.dequantize(raw, qtype, W.shape[1])
    theirs = ggml_dequantize(raw, qtype, W.shape[1])
    np.testing.assert_array_equal(ours, theirs)  # valid bytes: libggml reads what holdall meant

    a, b, lo, hi = grid_of(raw, qtype, W.shape[1])
    live = a != 0
    q = (theirs.astype(np.float64) - b)[live] / a[live]
    assert np.abs(q - np.rint(q)).max() < 1e-3  # every weight on its block's grid ...
    assert q.min() >= lo - 1e-3 and q.max() <= hi + 1e-3  # ... within the code range
    np.testing.assert_array_equal(theirs[~live], b[~live])

    imatrix_raw = quants.quantize(W, qtype, np.diagonal(H).copy())
    plain = output_error(W, ggml_dequantize(imatrix_raw, qtype, W.shape[1]), H)
    refined = output_error(W, theirs, H)
    assert (refined <= plain * (1 + 1e-6) + 1e-12).all()  # row by row never worse than the imatrix encoder
    assert refined.sum() < 0.75 * plain.sum()  # and clearly better with correlated inputs
    assert refine.layer_error(W, raw, qtype, H) == pytest.approx(refined.sum(), rel=1e-5)
    assert result.errors["chosen"] == pytest.approx(refined.mean(), rel=1e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_identity_hessian_gives_plain_rounding_on_the_same_scales(qtype):
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    start = quants.quantize(W, qtype, np.ones(512, np.float32))
    levels, raw = refine.feedback_codes(W, qtype, np.eye(512, dtype=np.float32), start)
    a, b, lo, hi = grid_of(start, qtype, 512)
    expected = np.clip(np.rint((W.astype(np.float64) - b) / np.where(a != 0, a, 1)), lo, hi)
    live = a != 0
    np.testing.assert_array_equal(levels[live], expected[live])
    # the scale fields are the encoder's: the new bytes decode onto the very same grids
    a2, b2, _, _ = grid_of(raw, qtype, 512)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)
    np.testing.assert_array_equal(ggml_dequantize(raw, qtype, 512)[live], (a * levels + b)[live])


def test_unrefined_types_fall_back_to_their_encoder():
    # every block type is refined (Q2_K and Q3_K: test_gguf_refine_k23.py); the float types are not
    W, H = correlated_case(3, n=256, n_rows=4)
    result = refine.refine_tensor(W, "F16", H)
    np.testing.assert_array_equal(result.raw, quants.quantize(W, "F16", np.diagonal(H).copy()))
    assert "not refined" in result.notes[0]
    with pytest.raises(ConfigError, match="no error-feedback path"):
        refine.feedback_codes(W, "BF16", H, result.raw)


def test_bad_input_is_refused():
    W, H = correlated_case(4, n=64, n_rows=2)
    with pytest.raises(DataError, match="expected \\[64, 64\\]"):
        refine.refine_tensor(W, "Q4_0", H[:32, :32])
    with pytest.raises(DataError, match="NaN"):
        refine.refine_tensor(W, "Q4_0", np.full_like(H, np.nan))
    with pytest.raises(ConfigError, match="blocks of 256"):
        refine.refine_tensor(W, "Q4_K", H)
    with pytest.raises(ConfigError, match="iterations"):
        refine.refine_tensor(W, "Q4_0", H, iterations=-1)


def test_collected_hessians_are_the_input_second_moments():
    import torch

    model = tiny_llama(hidden=64, layers=1, vocab=300, heads=4, kv_heads=2, intermediate=128, max_position=64)

    class Ids:  # a tokenizer stand-in: the text's bytes as token ids
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([list(text.encode())])}

    text = bytes(np.random.default_rng(0).integers(32, 127, 200, dtype=np.uint8)).decode()
    seen = {}
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", []).append(args[0].detach().double().reshape(-1, 128)))
    try:
        stats = collect_statistics(model, Ids(), text, n_ctx=64, max_chunks=3, progress=False, hessians=True)
    finally:
        hook.remove()
    x = torch.cat(seen["x"]).numpy()
    np.testing.assert_allclose(stats.hessians["blk.0.ffn_down.weight"], x.T @ x / len(x), rtol=1e-4, atol=1e-7)
    for name, h in stats.hessians.items():
        np.testing.assert_allclose(np.diagonal(h), stats.imatrix[name], rtol=1e-4, atol=1e-9)
    shared = stats.hessians
    assert shared["blk.0.attn_q.weight"] is shared["blk.0.attn_k.weight"] is shared["blk.0.attn_v.weight"]
    assert shared["blk.0.ffn_gate.weight"] is shared["blk.0.ffn_up.weight"]
    assert shared["blk.0.attn_output.weight"] is not shared["blk.0.attn_q.weight"]

    narrow = collect_statistics(model, Ids(), text, n_ctx=64, max_chunks=1, progress=False, hessians=True,
                                max_hessian_columns=100)
    assert "blk.0.ffn_down.weight" not in narrow.hessians and "blk.0.attn_q.weight" in narrow.hessians
    assert any("ffn_down" in note for note in narrow.notes)


@pytest.fixture(scope="module")
def smol_tok():
    from holdall.models import load_tokenizer

    return load_tokenizer("smollm2")


def test_refined_file_runs_in_llama_cpp(tmp_path, smol_tok, capsys):
    require_llama_cpp()
    from holdall.cli.main import main
    from holdall.data import wikitext2
    from holdall.evaluation.text import load_text

    model = tiny_llama(hidden=256, layers=2, vocab=49152, intermediate=512, max_position=512)
    model.save_pretrained(tmp_path / "tiny")
    smol_tok.save_pretrained(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text(load_text(wikitext2("valid"))[:20000])

    out = tmp_path / "tiny-refined.gguf"
    args = ["export", str(tmp_path / "tiny"), "--gguf", "Q4_K_M", "--calibrate", str(calib), "--calib-chunks", "2"]
    assert main([*args, "--refine", "gptq", "-o", str(out)]) == 0
    plain = export_gguf(model, tmp_path / "tiny-imatrix.gguf", "Q4_K_M", tokenizer=smol_tok,
                        calibration_text=calib.read_text(), calibration_chunks=2, progress=False)
    _, ours = read_gguf_fast(out)
    _, theirs = read_gguf_fast(plain)
    assert {k: v[:2] for k, v in ours.items()} == {k: v[:2] for k, v in theirs.items()}  # same types and shapes
    assert ours["blk.0.ffn_down.weight"][2] != theirs["blk.0.ffn_down.weight"][2]  # but other codes
    assert ours["token_embd.weight"][2] == theirs["token_embd.weight"][2]  # no Hessian for the embedding

    llm = llama_model(out)
    try:
        text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert isinstance(text, str) and llm.n_tokens > 5
    finally:
        llm.close()

    capsys.readouterr()
    assert main([*args[:4], "--refine", "gptq", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--calibrate" in capsys.readouterr().err


def test_export_refine_argument_is_checked(tmp_path, smol_tok):
    model = tiny_llama(hidden=256, layers=1, vocab=49152, intermediate=512)
    with pytest.raises(ConfigError, match="'none' or 'gptq'"):
        export_gguf(model, tmp_path / "x.gguf", "Q4_0", tokenizer=smol_tok, refine="awq", progress=False)
    with pytest.raises(ConfigError, match="needs calibration_text"):
        export_gguf(model, tmp_path / "x.gguf", "Q4_0", tokenizer=smol_tok, refine="gptq", progress=False)
    with pytest.raises(DataError, match="expected \\[256, 256\\]"):
        export_gguf(model, tmp_path / "x.gguf", "Q4_0", tokenizer=smol_tok, refine="gptq", progress=False,
                    hessians={"blk.0.attn_q.weight": np.eye(3)})
