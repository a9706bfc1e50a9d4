"""Artifact scoring (holdall.evaluation.scoring) against independent references: transformers' own loss, and
llama.cpp running an F32 GGUF of the same model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama
from holdall.errors import ConfigError, DataError
from holdall.evaluation.scoring import IGNORE_INDEX, TorchScorer, score_sequences, scored_positions

pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_loss(model, ids, labels) -> tuple[float, int]:
    """transformers' own shifted cross-entropy (its mean) and the number of scored tokens."""
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    n = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
    return float(out.loss), n


def test_heldout_loss_equals_transformers_loss_token_weighted():
    model = make_tiny_llama(vocab=128)
    torch.manual_seed(1)
    seqs = []
    for length, prompt in ((12, 5), (20, 3), (7, 6)):
        ids = torch.randint(3, 128, (length,)).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        seqs.append((ids, labels))
    score = score_sequences(TorchScorer(model), seqs)
    with torch.no_grad():
        parts = [_hf_loss(model, ids, labels) for ids, labels in seqs]
    expected = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert score.n_tokens == sum(n for _, n in parts)
    assert score.n_sequences == 3
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_kld_against_itself_is_zero_and_against_another_model_matches_torch():
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    ids = torch.randint(0, 128, (16,)).tolist()
    same = score_sequences(TorchScorer(a), [(ids, None)], reference=TorchScorer(a))
    assert same.kld_mean == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    other = score_sequences(TorchScorer(b), [(ids, None)], reference=TorchScorer(a))
    with torch.no_grad():
        p = torch.log_softmax(a(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        q = torch.log_softmax(b(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    expected = float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum")) / (len(ids) - 1)
    assert other.kld_mean == pytest.approx(expected, rel=1e-4)
    assert other.reference_nll == pytest.approx(same.nll, rel=1e-6)


def test_scored_positions_follow_the_shifted_labels():
    positions, targets = scored_positions([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    assert positions.tolist() == [1, 2] and targets.tolist() == [7, 8]
    positions, targets = scored_positions([5, 6, 7], None)
    assert positions.tolist() == [0, 1] and targets.tolist() == [6, 7]
    with pytest.raises(DataError, match="differ in length"):
        scored_positions([1, 2], [1])


def test_no_scored_token_and_broken_scorers_are_clear_errors():
    model = make_tiny_llama()
    with pytest.raises(DataError, match="no scored token"):
        score_sequences(TorchScorer(model), [([1, 2, 3], [IGNORE_INDEX] * 3)])

    class Broken:
        name = "broken"

        def log_probs(self, ids):
            return torch.full((len(ids), 128), float("nan"))

    with pytest.raises(DataError, match="NaN"):
        score_sequences(Broken(), [([1, 2, 3], None)])

    class WrongShape:
        name = "wrong"

        def log_probs(self, ids):
            return torch.zeros(len(ids) + 1, 128)

    with pytest.raises(ConfigError, match="shape"):
        score_sequences(WrongShape(), [([1, 2, 3], None)])


def test_llamacpp_scorer_matches_torch_on_an_f32_gguf(tmp_path):
    from gguf_helpers import hf_tokenizer_from_spm, require_llama_cpp, tiny_llama, train_spm

    require_llama_cpp()
    pytest.importorskip("sentencepiece")
    from holdall.evaluation.scoring import LlamaCppScorer
    from holdall.formats.gguf.export import export_gguf

    tok = hf_tokenizer_from_spm(train_spm(tmp_path))
    model = tiny_llama(hidden=64, layers=2, vocab=1000, heads=4, kv_heads=2, intermediate=128)
    path = export_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=tok, progress=False)
    ids = tok("the quick brown fox jumps over the lazy dog, twice: the quick brown fox")["input_ids"]
    labels = [IGNORE_INDEX] * 4 + ids[4:]
    llama = LlamaCppScorer(path, n_ctx=64, threads=1)
    ours = score_sequences(llama, [(ids, labels)], reference=TorchScorer(model))
    torch_only = score_sequences(TorchScorer(model), [(ids, labels)])
    # llama.cpp's F32 forward matches transformers' to ~1e-5 in the logits (tests/test_gguf_export.py)
    assert ours.nll == pytest.approx(torch_only.nll, abs=1e-4)
    assert ours.kld_mean < 1e-7 and ours.top1_agreement == 1.0
    with pytest.raises(ConfigError, match="does not fit n_ctx"):
        llama.log_probs(list(range(65)))
