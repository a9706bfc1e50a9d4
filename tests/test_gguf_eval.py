"""``evaluate_gguf``: llama.cpp's perplexity protocol on a GGUF file, checked against plain torch math on the
same model in transformers (independent of llama.cpp), and ``holdall eval FILE.gguf`` on the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gguf_helpers import require_llama_cpp, tiny_llama

from holdall.errors import DataError, ModelNotFoundError
from holdall.evaluation.llamacpp import evaluate_gguf
from holdall.formats.gguf.export import export_gguf
from holdall.models import load_tokenizer

N_CTX = 64
TEXT = " ".join(["The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat."] * 40)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    require_llama_cpp()
    tok = load_tokenizer("smollm2")
    model = tiny_llama(vocab=len(tok), hidden=256, layers=2, seed=3)
    folder = tmp_path_factory.mktemp("gguf-eval")
    f32 = export_gguf(model, folder / "tiny-f32.gguf", "F32", tokenizer=tok, progress=False)
    q4 = export_gguf(model, folder / "tiny-q4_0.gguf", "Q4_0", tokenizer=tok, progress=False)
    return model, tok, f32, q4


def torch_reference_ppl(model, tok, text: str, n_ctx: int, max_chunks: int) -> float:
    """llama-perplexity's protocol written out in torch: chunks of n_ctx, the second half scored."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    for c in range(min(len(ids) // n_ctx, max_chunks)):
        chunk = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        positions = torch.arange(n_ctx // 2, n_ctx - 1)
        nll -= float(logp[positions, chunk[0, positions + 1]].sum())
        count += len(positions)
    return math.exp(nll / count)


def test_perplexity_matches_torch_on_the_same_model(exported):
    model, tok, f32, _ = exported
    result = evaluate_gguf(f32, TEXT, n_ctx=N_CTX, max_chunks=4, progress=False)
    assert result.n_windows == 4 and result.n_tokens == 4 * (N_CTX // 2 - 1)
    reference = torch_reference_ppl(model, tok, TEXT, N_CTX, 4)
    assert result.ppl == pytest.approx(reference, rel=2e-3)  # llama.cpp keeps its KV cache in F16


def test_kld_of_a_file_against_itself_is_zero_and_quantization_raises_it(exported):
    _, _, f32, q4 = exported
    same = evaluate_gguf(f32, TEXT, n_ctx=N_CTX, max_chunks=2, base_path=f32, progress=False)
    assert same.kld_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    assert same.base_ppl == pytest.approx(same.ppl)
    q = evaluate_gguf(q4, TEXT, n_ctx=N_CTX, max_chunks=2, base_path=f32, progress=False)
    assert q.kld_mean > 1e-5 and q.base_ppl == pytest.approx(same.ppl)


def test_a_base_cache_gives_the_same_scores(exported):
    # scoring several files against one base: the base's log-probs are computed once and reused
    _, _, f32, q4 = exported
    plain = evaluate_gguf(q4, TEXT, n_ctx=N_CTX, max_chunks=2, base_path=f32, progress=False)
    cache: dict = {}
    first = evaluate_gguf(q4, TEXT, n_ctx=N_CTX, max_chunks=2, base_path=f32, progress=False, base_cache=cache)
    (entry,) = cache.values()
    assert len(entry["logp"]) == 2  # one per chunk
    again = evaluate_gguf(q4, TEXT, n_ctx=N_CTX, max_chunks=2, base_path=f32, progress=False, base_cache=cache)
    assert len(cache) == 1 and len(entry["logp"]) == 2
    for r in (first, again):
        assert r.kld_mean == pytest.approx(plain.kld_mean, rel=1e-5, abs=1e-9)
        assert r.base_ppl == pytest.approx(plain.base_ppl, rel=1e-6) and r.ppl == plain.ppl
        assert r.top1_agreement == plain.top1_agreement


def test_clear_errors(exported, tmp_path):
    _, _, f32, _ = exported
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        evaluate_gguf(tmp_path / "missing.gguf", TEXT)
    with pytest.raises(DataError, match="fewer than one"):
        evaluate_gguf(f32, "too short", n_ctx=N_CTX, progress=False)


def test_cli_eval_of_a_gguf_file_uses_llama_cpp(exported, tmp_path, capsys):
    from holdall.cli.main import main

    _, _, f32, q4 = exported
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code = main(["eval", str(q4), "--text", str(text), "--n-ctx", str(N_CTX), "--max-windows", "2",
                 "--kld-vs", str(f32), "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["engine"] == "llama.cpp" and record["n_windows"] == 2 and record["kld_mean"] > 0


def test_imatrix_is_the_mean_squared_input_of_each_linear(exported):
    """collect_imatrix against a hand computation on one linear: mean over tokens of x_j²."""
    from holdall.formats.gguf.imatrix import collect_imatrix

    model, tok, _, _ = exported
    imatrix = collect_imatrix(model, tok, TEXT, n_ctx=N_CTX, max_chunks=2, progress=False)
    assert len(imatrix) == 7 * len(model.model.layers)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        for c in range(2):
            model(ids[c * N_CTX:(c + 1) * N_CTX][None])
    handle.remove()
    x = torch.cat(seen).double()  # [2 * N_CTX, intermediate]
    expected = x.pow(2).mean(dim=0).float().numpy()
    assert imatrix["blk.1.ffn_down.weight"].shape == expected.shape
    assert abs(imatrix["blk.1.ffn_down.weight"] - expected).max() <= 1e-6 * abs(expected).max()


def test_calibrated_export_uses_the_importances(exported, tmp_path):
    """With calibration text the encoder's imatrix path runs: different bytes from the plain export, and the
    same bytes as encoding with the collected imatrix passed explicitly."""
    from holdall.formats.gguf.imatrix import collect_imatrix
    from gguf_helpers import read_gguf_fast

    model, tok, _, _ = exported
    plain = export_gguf(model, tmp_path / "plain.gguf", "Q4_0", tokenizer=tok, progress=False)
    calibrated = export_gguf(model, tmp_path / "cal.gguf", "Q4_0", tokenizer=tok, progress=False,
                             calibration_text=TEXT, calibration_chunks=2)
    imatrix = collect_imatrix(model, tok, TEXT, max_chunks=2, progress=False)
    explicit = export_gguf(model, tmp_path / "explicit.gguf", "Q4_0", tokenizer=tok, progress=False, imatrix=imatrix)
    _, t_plain = read_gguf_fast(plain)
    _, t_cal = read_gguf_fast(calibrated)
    _, t_explicit = read_gguf_fast(explicit)
    assert t_cal == t_explicit
    assert t_cal["blk.0.ffn_down.weight"][2] != t_plain["blk.0.ffn_down.weight"][2]
