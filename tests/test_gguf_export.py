"""GGUF export checked against llama.cpp itself: the exported file, loaded by llama-cpp-python, must give the
logits transformers gives for the same model, and tokenize text as the original tokenizer does.

Tiny random models (hidden 256 so K-quants apply; 8 query / 2 key-value heads) with real tokenizers: SmolLM2's
(byte-level BPE, from the shipped GGUF) and a SentencePiece model trained here. Type choice and encoder bytes
against ``llama_model_quantize`` are in test_gguf_filetypes.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_helpers import (
    hf_logits,
    hf_tokenizer_from_spm,
    llama_logits,
    llama_model,
    need_encoders,
    read_gguf_fast,
    require_llama_cpp,
    tiny_llama,
    tiny_qwen2,
    train_spm,
)

from holdall.errors import ConfigError, DataError, MissingDependencyError, UnsupportedModelError
from holdall.formats.gguf import export as export_module
from holdall.formats.gguf.export import export_gguf
from holdall.formats.gguf.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, vocab_from_tokenizer

pytest.importorskip("gguf")

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, 123 and 4567! naïve café, 日本語 🦙",
    "def f(x):\n    return x ** 2  # squares\n\n\ttabs too",
]
F32_ATOL = 1e-5  # llama.cpp with F32 weights and an F32 KV cache vs transformers in float32: ~1e-6 seen


@pytest.fixture(scope="module")
def smol_tok():
    from holdall.models import load_tokenizer

    try:
        return load_tokenizer("smollm2")
    except MissingDependencyError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def spm_tok(spm_file):
    return hf_tokenizer_from_spm(spm_file)


def _ids(tok, text=SAMPLES[0]) -> list[int]:
    return tok.encode(text)


# ------------------------------------------------------------------------------------ logits parity


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_f32_matches_transformers(tmp_path, smol_tok, tie):
    require_llama_cpp()
    need_encoders("F32")
    model = tiny_llama(vocab=49152, tie=tie)
    path = export_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=smol_tok, progress=False)

    fields, tensors = read_gguf_fast(path)
    assert ("output.weight" in tensors) == (not tie)  # tied: llama.cpp reuses token_embd as the head
    assert {t for t, _, _ in tensors.values()} == {"F32"}
    assert tensors["blk.0.attn_q.weight"][1] == (256, 256) and tensors["blk.0.attn_k.weight"][1] == (256, 64)
    expected = {
        "general.architecture": "llama", "general.file_type": 0, "general.quantization_version": 2,
        "llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 256,
        "llama.feed_forward_length": 512, "llama.attention.head_count": 8, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 32, "llama.vocab_size": 49152, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    ids = _ids(smol_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)

    llm = llama_model(path)
    try:
        for text in SAMPLES:
            assert llm.tokenize(text.encode(), add_bos=True) == smol_tok.encode(text), text
        chat = smol_tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False)
        assert llm.tokenize(chat.encode(), add_bos=True, special=True) == smol_tok.encode(chat)
        assert llm.detokenize(smol_tok.encode(SAMPLES[1])).decode() == SAMPLES[1]
    finally:
        llm.close()


def test_llama_f16_stores_half_weights_and_matches(tmp_path, smol_tok):
    require_llama_cpp()
    need_encoders("F32", "F16")
    model = tiny_llama(vocab=49152, tie=True, layers=1)
    path = export_gguf(model, tmp_path / "m.gguf", "f16", tokenizer=smol_tok, progress=False)
    fields, tensors = read_gguf_fast(path)
    assert fields["general.file_type"] == 1
    assert tensors["token_embd.weight"][0] == "F16" and tensors["blk.0.attn_norm.weight"][0] == "F32"
    ids = _ids(smol_tok)
    # llama.cpp also rounds activations to F16 for F16 matmuls, so compare with slack
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=2e-2, rtol=0)


def test_qwen2_biases_and_no_permutation(tmp_path, smol_tok):
    require_llama_cpp()
    need_encoders("F32")
    model = tiny_qwen2()
    path = export_gguf(model, tmp_path / "q.gguf", "F32", tokenizer=smol_tok, progress=False)
    fields, tensors = read_gguf_fast(path)
    assert fields["general.architecture"] == "qwen2" and "output.weight" not in tensors
    for name in ("attn_q", "attn_k", "attn_v"):
        assert tensors[f"blk.1.{name}.bias"][0] == "F32"
    q_rows = np.frombuffer(tensors["blk.0.attn_q.weight"][2], np.float32).reshape(256, 256)
    np.testing.assert_array_equal(q_rows, model.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    ids = _ids(smol_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


def test_mistral_is_written_as_llama(tmp_path, spm_tok):
    require_llama_cpp()
    need_encoders("F32")
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, sliding_window=None)
    model = MistralForCausalLM(config).eval()
    path = export_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=spm_tok, progress=False)
    assert read_gguf_fast(path)[0]["general.architecture"] == "llama"
    ids = _ids(spm_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_with_biases(tmp_path, spm_tok, bias):
    require_llama_cpp()
    need_encoders("F32")
    model = tiny_llama(**{bias: True})
    with torch.no_grad():  # biases start at zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    path = export_gguf(model, tmp_path / "b.gguf", "F32", tokenizer=spm_tok, progress=False)
    ids = _ids(spm_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
], ids=lambda r: r["rope_type"])
def test_rope_scaling(tmp_path, spm_tok, rope):
    require_llama_cpp()
    need_encoders("F32")
    model = tiny_llama(rope_parameters=rope, heads=4)
    path = export_gguf(model, tmp_path / "r.gguf", "F32", tokenizer=spm_tok, progress=False)
    fields, tensors = read_gguf_fast(path)
    assert ("rope_freqs.weight" in tensors) == (rope["rope_type"] == "llama3")
    if rope["rope_type"] != "llama3":
        assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    ids = [1] + np.random.default_rng(0).integers(3, 1000, 100).tolist()  # well past the original context
    expected = hf_logits(model, ids)
    unscaled = hf_logits(tiny_llama(heads=4, rope_parameters={"rope_type": "default",
                                                              "rope_theta": rope["rope_theta"]}), ids)
    assert np.abs(unscaled - expected).max() > 100 * F32_ATOL  # the scaling is visible in the logits
    np.testing.assert_allclose(llama_logits(path, ids), expected, atol=F32_ATOL, rtol=0)


# ------------------------------------------------------------------------------------- tokenizers


def test_smollm2_vocab_is_the_one_llama_cpp_shipped(smol_tok):
    """Our tokenizer keys for SmolLM2 equal those of the GGUF HuggingFaceTB published (made by llama.cpp)."""
    from holdall.models import resolve_model

    original, _ = read_gguf_fast(Path(resolve_model("smollm2").location))
    vocab = vocab_from_tokenizer(smol_tok, 49152)
    assert vocab.tokens == original["tokenizer.ggml.tokens"]
    assert vocab.token_types == original["tokenizer.ggml.token_type"]
    assert vocab.merges == original["tokenizer.ggml.merges"]
    assert vocab.pre == original["tokenizer.ggml.pre"]
    assert vocab.chat_template == original["tokenizer.chat_template"]
    assert vocab.special_ids == {
        "bos": original["tokenizer.ggml.bos_token_id"], "eos": original["tokenizer.ggml.eos_token_id"],
        "unk": original["tokenizer.ggml.unknown_token_id"], "pad": original["tokenizer.ggml.padding_token_id"],
    }
    assert vocab.add_bos is original["tokenizer.ggml.add_bos_token"]


@pytest.mark.parametrize("source", ["tokenizer.json", "sentencepiece"])
def test_sentencepiece_tokenizer(tmp_path, spm_file, source):
    require_llama_cpp()
    need_encoders("F32")
    import sentencepiece as spm

    tok = hf_tokenizer_from_spm(spm_file)
    if source == "sentencepiece":
        tok.vocab_file = str(spm_file)  # as a tokenizer loaded from a folder with tokenizer.model has
    model = tiny_llama()
    path = export_gguf(model, tmp_path / "s.gguf", "F32", tokenizer=tok, progress=False)
    fields, _ = read_gguf_fast(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and types[500] == NORMAL
    scores = fields["tokenizer.ggml.scores"]
    assert scores[300] > scores[301] > scores[900]  # earlier merges score higher

    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    llm = llama_model(path)
    try:
        for text in SAMPLES + ["  two leading spaces", "Senjō no Valkyria 3 : Unrecorded Chronicles"]:
            ours = llm.tokenize(text.encode(), add_bos=True)
            assert ours == [1] + sp.encode(text), text  # SentencePiece itself is the reference
            if not text.startswith(" "):  # transformers' Metaspace differs from SentencePiece on leading spaces
                assert ours == tok.encode(text), text
    finally:
        llm.close()
    ids = _ids(tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


def test_word_level_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    model = tiny_llama(vocab=128)
    with pytest.raises(UnsupportedModelError, match="WordLevel"):
        export_gguf(model, tmp_path / "w.gguf", "F32", tokenizer=tiny_tokenizer, progress=False)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, spm_tok):
    with pytest.raises(DataError, match="embedding has only 500 rows"):
        export_gguf(tiny_llama(vocab=500), tmp_path / "x.gguf", "F32", tokenizer=spm_tok, progress=False)


def test_padding_rows_beyond_the_tokenizer(tmp_path, spm_tok):
    need_encoders("F32")
    path = export_gguf(tiny_llama(vocab=1024), tmp_path / "p.gguf", "F32", tokenizer=spm_tok, progress=False)
    fields, _ = read_gguf_fast(path)
    assert len(fields["tokenizer.ggml.tokens"]) == 1024 and fields["tokenizer.ggml.tokens"][1023] == "[PAD1023]"


# ------------------------------------------------------------------------- quantized and adapted models


def test_holdall_quantized_model_needs_force(tmp_path, spm_tok):
    need_encoders("F32")
    from holdall import QuantConfig, quantize

    model = tiny_llama()
    one_layer = (r"model\.layers\.0\.mlp\.down_proj",)  # one QuantLinear is enough, and quick
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=128, targets=one_layer), progress=False)
    with pytest.raises(ConfigError, match="round the weights twice"):
        export_gguf(model, tmp_path / "q.gguf", "Q4_K_M", tokenizer=spm_tok, progress=False)
    assert not (tmp_path / "q.gguf").exists()

    # force: the dequantized weights are exported, so llama.cpp reproduces the quantized model's outputs
    require_llama_cpp()
    path = export_gguf(model, tmp_path / "q.gguf", "F32", tokenizer=spm_tok, force=True, progress=False)
    ids = _ids(spm_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


def test_unmerged_lora_is_refused(tmp_path, spm_tok):
    from holdall import LoraConfig, add_lora

    model = add_lora(tiny_llama(), LoraConfig(r=4))
    with pytest.raises(ConfigError, match="merge"):
        export_gguf(model, tmp_path / "l.gguf", "F16", tokenizer=spm_tok, progress=False)


def test_merged_finetune_directory_converts(tmp_path, spm_tok):
    """A plain HF directory (what holdall merge writes) exports by path, tokenizer included."""
    require_llama_cpp()
    need_encoders("F32")
    model = tiny_llama()
    model.save_pretrained(tmp_path / "merged")
    spm_tok.save_pretrained(tmp_path / "merged")
    path = export_gguf(tmp_path / "merged", tmp_path / "m.gguf", "F32", progress=False)
    assert read_gguf_fast(path)[0]["general.name"] == "merged"
    ids = _ids(spm_tok)
    np.testing.assert_allclose(llama_logits(path, ids), hf_logits(model, ids), atol=F32_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- errors


def test_unknown_file_type_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="Q4_K_M"):
        export_gguf(tmp_path / "no-such-model", tmp_path / "x.gguf", "Q4_K_XL")


def test_unsupported_architecture(tmp_path, spm_tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="qwen3"):
        export_gguf(Qwen3ForCausalLM(config), tmp_path / "x.gguf", "F16", tokenizer=spm_tok, progress=False)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match="tokenizer"):
        export_gguf(tiny_llama(), tmp_path / "x.gguf", "F16", progress=False)


def test_unwritable_output(tmp_path, spm_tok):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not a writable folder"):
        export_gguf(tiny_llama(), blocker / "out.gguf", "F16", tokenizer=spm_tok, progress=False)
    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(tiny_llama(), tmp_path, "F16", tokenizer=spm_tok, progress=False)


def test_failed_export_leaves_no_partial_file(tmp_path, spm_tok, monkeypatch):
    need_encoders("F16")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")
    real, calls = export_module.encode_tensor, []

    def failing(tensor, qtype, importance=None):
        calls.append(tensor.name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(tensor, qtype, importance)

    monkeypatch.setattr(export_module, "encode_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(tiny_llama(), out, "F16", tokenizer=spm_tok, progress=False)
    assert out.read_bytes() == b"the previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]  # no temp file left behind


def test_imatrix_is_checked(tmp_path, spm_tok):
    model = tiny_llama()
    cases = [
        ({"blk.0.nope.weight": np.ones(256)}, "no tensor called"),
        ({"blk.0.attn_q.weight": np.ones(255)}, "255 values"),
        ({"blk.0.attn_q.weight": np.full(256, np.nan)}, "NaN"),
    ]
    for imatrix, message in cases:
        with pytest.raises(DataError, match=message):
            export_gguf(model, tmp_path / "x.gguf", "Q4_K_M", tokenizer=spm_tok, imatrix=imatrix, progress=False)


# -------------------------------------------------------------------------------------------- CLI


def test_cli_export(tmp_path, capsys, spm_tok):
    require_llama_cpp()
    need_encoders("F32", "Q8_0", "Q6_K")
    from holdall.cli.main import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    spm_tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "tiny-q8.gguf"
    assert main(["export", str(tmp_path / "tiny"), "--gguf", "q8_0", "-o", str(out)]) == 0
    assert "saved" in capsys.readouterr().out
    llm = llama_model(out)
    try:
        assert len(llm.tokenize(b"hello")) > 1
    finally:
        llm.close()

    assert main(["export", str(tmp_path / "tiny"), "--gguf", "Q8_0", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "tiny"), "--gguf", "Q9", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "unknown GGUF file type" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_export_runs_in_llama_cpp(tmp_path):
    """The shipped SmolLM2-135M (a Q4_1 GGUF, dequantized on load) re-exported at F16 runs like the original."""
    require_llama_cpp()
    need_encoders("F16")
    from holdall.models import load_model, resolve_model

    model, tok = load_model("smollm2")
    path = export_gguf(model, tmp_path / "smollm2-f16.gguf", "F16", tokenizer=tok, progress=False)
    ids = tok.encode("The capital of France is")
    ours = llama_logits(path, ids)
    original = llama_logits(Path(resolve_model("smollm2").location), ids)
    assert (ours.argmax(-1) == original.argmax(-1)).all()
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=0.15, rtol=0)
