"""Perplexity and KL divergence against hand-written references on tiny random Llamas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from holdall.errors import ConfigError, DataError
from holdall.evaluation import evaluate, evaluate_many, format_result, format_results, make_windows
from holdall.evaluation import perplexity as perplexity_module

transformers = pytest.importorskip("transformers")

VOCAB = 97
SEQ = 16


def tiny_llama(seed: int = 0, max_pos: int = 64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=max_pos,
        initializer_range=0.3,  # peaked distributions, so perturbations move KL measurably
    )
    return transformers.LlamaForCausalLM(config).eval()


def perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return other


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (12 * SEQ + 11,), generator=torch.Generator().manual_seed(7))


def reference_logits(model, ids, seq_len):
    """Windows cut by hand: [k*seq_len, (k+1)*seq_len) for every full window; the tail is ignored."""
    out = []
    with torch.no_grad():
        for k in range(ids.numel() // seq_len):
            window = ids[k * seq_len:(k + 1) * seq_len]
            out.append((window, model(window[None]).logits[0]))
    return out


def reference_ppl(model, ids, seq_len):
    total, count = 0.0, 0
    for window, logits in reference_logits(model, ids, seq_len):
        total += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
        count += seq_len - 1
    return math.exp(total / count), count


def test_ppl_equals_hand_computed_cross_entropy(ids):
    model = tiny_llama()
    result = evaluate(model, input_ids=ids, seq_len=SEQ, progress=False)
    ppl, count = reference_ppl(model, ids, SEQ)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.nll == pytest.approx(math.log(ppl), rel=1e-5)
    assert (result.n_windows, result.n_tokens, result.seq_len) == (12, count, SEQ)
    assert result.kld_mean is None and result.top1_agreement is None and result.base_ppl is None


def test_windows_non_overlapping_and_remainder_dropped(ids):
    windows = make_windows(ids, SEQ)
    assert windows.shape == (12, SEQ)
    assert torch.equal(windows.flatten(), ids[: 12 * SEQ])  # consecutive, non-overlapping
    model = tiny_llama()
    changed_tail = ids.clone()
    changed_tail[12 * SEQ:] = (changed_tail[12 * SEQ:] + 1) % VOCAB
    a = evaluate(model, input_ids=ids, seq_len=SEQ, progress=False)
    b = evaluate(model, input_ids=changed_tail, seq_len=SEQ, progress=False)
    assert a.ppl == b.ppl  # the remainder never reaches the model
    # windows are independent: scoring the second window alone gives its share of the total
    w1 = evaluate(model, input_ids=ids[SEQ:2 * SEQ], seq_len=SEQ, progress=False)
    window, logits = reference_logits(model, ids, SEQ)[1]
    assert w1.nll == pytest.approx(F.cross_entropy(logits[:-1], window[1:]).item(), rel=1e-5)


def test_max_windows_takes_the_first_windows(ids):
    model = tiny_llama()
    result = evaluate(model, input_ids=ids, seq_len=SEQ, max_windows=3, progress=False)
    ppl, _ = reference_ppl(model, ids[: 3 * SEQ], SEQ)
    assert result.n_windows == 3 and result.ppl == pytest.approx(ppl, rel=1e-5)


def test_kld_of_model_against_an_identical_copy_is_zero(ids):
    model = tiny_llama()
    result = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=copy.deepcopy(model), progress=False)
    assert result.kld_mean == pytest.approx(0.0, abs=1e-7)
    assert result.top1_agreement == 1.0
    assert result.base_ppl == pytest.approx(result.ppl, rel=1e-6)


def test_kld_against_perturbed_copy_matches_torch_kl_div(ids):
    base = tiny_llama()
    model = perturbed(base)
    result = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=base, progress=False)
    kl_sum, agree, n = 0.0, 0, 0
    for (window, logits_b), (_, logits_m) in zip(reference_logits(base, ids, SEQ), reference_logits(model, ids, SEQ)):
        log_p = F.log_softmax(logits_b[:-1].double(), -1)
        log_q = F.log_softmax(logits_m[:-1].double(), -1)
        # kl_div(input=log Q, target=log P) = sum P (log P - log Q) = KL(P_base || Q_model)
        kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += (logits_b[:-1].argmax(-1) == logits_m[:-1].argmax(-1)).sum().item()
        n += SEQ - 1
    assert result.kld_mean > 1e-4
    assert result.kld_mean == pytest.approx(kl_sum / n, rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree / n)
    assert result.top1_agreement < 1.0
    assert result.base_ppl == pytest.approx(reference_ppl(base, ids, SEQ)[0], rel=1e-5)


def test_chunked_scoring_equals_unchunked(ids, monkeypatch):
    base = tiny_llama()
    model = perturbed(base)
    whole = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=base, progress=False)
    monkeypatch.setattr(perplexity_module, "_CHUNK_BYTES", 4 * VOCAB * 3)  # 3 positions per chunk
    chunked = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=base, progress=False)
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-6)
    assert chunked.kld_mean == pytest.approx(whole.kld_mean, rel=1e-5)
    assert chunked.top1_agreement == whole.top1_agreement


def test_evaluate_many_matches_evaluate(ids):
    base = tiny_llama()
    models = {"small-noise": perturbed(base, 0.02), "big-noise": perturbed(base, 0.2, seed=3), "base": base}
    many = evaluate_many(models, input_ids=ids, base=base, seq_len=SEQ, progress=False)
    assert list(many) == list(models)
    for name, model in models.items():
        single = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=base, progress=False)
        assert many[name].ppl == pytest.approx(single.ppl, rel=1e-6)
        assert many[name].kld_mean == pytest.approx(single.kld_mean, rel=1e-6, abs=1e-9)
        assert many[name].top1_agreement == single.top1_agreement
    assert many["base"].kld_mean == 0.0  # the base object itself reuses the base logits
    assert many["big-noise"].kld_mean > many["small-noise"].kld_mean
    table = format_results(many)
    assert "big-noise" in table and "KL" in table


def test_base_logits_computed_once_per_window(ids):
    base = tiny_llama()
    models = {f"m{i}": perturbed(base, 0.05, seed=i) for i in range(3)}  # copies made before patching
    calls = {"n": 0}
    forward = base.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    base.forward = counting_forward
    evaluate_many(models, input_ids=ids, base=base, seq_len=SEQ, max_windows=4, progress=False)
    assert calls["n"] == 4


def test_text_and_tokenizer_path():
    class CharTokenizer:
        def __call__(self, text, return_tensors=None, verbose=True):
            return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}

    text = "the quick brown fox jumps over the lazy dog. " * 4
    model = tiny_llama()
    result = evaluate(model, CharTokenizer(), text, seq_len=SEQ, progress=False)
    ids = torch.tensor([ord(c) % VOCAB for c in text])
    assert result.ppl == pytest.approx(reference_ppl(model, ids, SEQ)[0], rel=1e-5)
    assert result.n_windows == len(text) // SEQ


def test_too_short_text_names_the_fix():
    with pytest.raises(DataError, match="seq-len|longer"):
        evaluate(tiny_llama(), input_ids=torch.arange(10), seq_len=SEQ, progress=False)


def test_seq_len_beyond_max_positions():
    with pytest.raises(DataError, match="max_position_embeddings.*--seq-len 32"):
        evaluate(tiny_llama(max_pos=32), input_ids=torch.arange(200) % VOCAB, seq_len=64, progress=False)


def test_nan_logits_name_the_window(ids):
    model = tiny_llama()
    original = model.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs["input_ids"][0, 0] == ids[2 * SEQ]:
            out.logits[0, 3, 5] = float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(DataError, match="window 2"):
        evaluate(model, input_ids=ids, seq_len=SEQ, progress=False)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="input_ids"):
        evaluate(model, progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate(model, text="hello world", progress=False)
    with pytest.raises(DataError, match="vocabulary"):
        evaluate(model, input_ids=torch.arange(40) + VOCAB, seq_len=SEQ, progress=False)
    with pytest.raises(ConfigError, match="seq_len"):
        evaluate(model, input_ids=torch.arange(40), seq_len=1, progress=False)


def test_training_mode_restored_and_result_serialises(ids):
    model = tiny_llama().train()
    result = evaluate(model, input_ids=ids, seq_len=SEQ, max_windows=2, progress=False)
    assert model.training
    data = result.to_dict()
    assert set(data) >= {"ppl", "nll", "n_tokens", "n_windows", "seq_len", "kld_mean", "top1_agreement",
                         "base_ppl", "seconds"}
    text = format_result(result, "tiny")
    assert "perplexity" in text and f"{result.ppl:.4f}" in text


def test_bf16_model_scored_in_float32(ids):
    base = tiny_llama()
    model = copy.deepcopy(base).to(torch.bfloat16)
    result = evaluate(model, input_ids=ids, seq_len=SEQ, base_model=base, progress=False)
    assert math.isfinite(result.ppl) and 0 <= result.kld_mean < 0.1
