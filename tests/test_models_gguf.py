"""GGUF input: a tiny llama written with the gguf package loads with the original logits, is cached, and
corrupt or unsupported files fail before transformers sees them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from holdall.errors import CorruptFileError, UnsupportedModelError
from holdall.models import load_config, load_model, load_tokenizer, resolve_model
from holdall.models.files import check_gguf
from holdall.models.loading import gguf_cache_dir

gguf = pytest.importorskip("gguf")

# HF linear/norm name inside a block -> llama.cpp tensor name.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py reorders q/k rows for llama.cpp's rotary layout; transformers undoes it on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokens(n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<unk>", "<s>", "</s>"] + ["\u2581" + c for c in letters] + list(letters)
    return tokens + [f"\u2581w{i}" for i in range(n - len(tokens))]


def write_tiny_gguf(model, path: Path, arch: str = "llama") -> Path:
    """Write a float32 llama GGUF (SentencePiece-style vocab) holding ``model``'s weights."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(0)  # all F32
    tokens = _tokens(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))  # unknown, control, control, normal...
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = _permute_for_gguf(w, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                w = _permute_for_gguf(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "holdall-cache"
    monkeypatch.setenv("HOLDALL_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = make_tiny_llama(vocab=96)
    path = write_tiny_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 20, 33, 70]])


def test_resolve_gguf_file_and_folder_with_one_gguf(tiny_gguf):
    _, path = tiny_gguf
    assert resolve_model(path).kind == "gguf"
    assert resolve_model(str(path.parent)).location == str(path)  # a folder holding exactly one .gguf


def test_tiny_gguf_loads_with_original_logits_and_is_cached(tiny_gguf, cache):
    original, path = tiny_gguf
    model, tokenizer = load_model(path)
    assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    assert tokenizer is not None and tokenizer("abc").input_ids

    cached = gguf_cache_dir(path)
    assert cached.is_relative_to(cache) and (cached / "model.safetensors").is_file()
    assert not getattr(model.config, "quantization_config", None)  # the GGUF marker is gone

    again, _ = load_model(path)  # second load comes from the cache and is the same model
    assert torch.equal(_logits(again, IDS), _logits(original, IDS))
    assert again.holdall_source.kind == "gguf"


def test_cache_key_changes_when_the_file_changes(tiny_gguf, cache, tmp_path):
    _, path = tiny_gguf
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    before = gguf_cache_dir(copy)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert gguf_cache_dir(copy) != before


def test_gguf_tokenizer_and_config_without_converting(tiny_gguf, cache):
    original, path = tiny_gguf
    config = load_config(path)
    assert config.model_type == "llama" and config.num_hidden_layers == original.config.num_hidden_layers
    assert load_tokenizer(path) is not None
    assert not gguf_cache_dir(path).exists()


def test_check_gguf_summary(tiny_gguf):
    _, path = tiny_gguf
    summary = check_gguf(path)
    assert summary.architecture == "llama" and summary.version == 3
    assert summary.tensor_types == {"F32": summary.n_tensors}


def test_truncated_gguf_is_corrupt(tiny_gguf, tmp_path, cache):
    _, path = tiny_gguf
    data = path.read_bytes()
    for cut in (len(data) - 100, 2000, 10):  # inside tensor data, inside the metadata, inside the header
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError) as err:
            load_model(bad)
        assert str(bad) in str(err.value) and "re-download" in str(err.value).lower()
    with pytest.raises(CorruptFileError, match="truncated"):
        check_gguf(tmp_path / f"cut{len(data) - 100}.gguf")


def test_wrong_magic_and_version_are_corrupt(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    data = bytearray(path.read_bytes())
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(CorruptFileError, match="magic"):
        load_model(not_gguf)
    data[4:8] = (99).to_bytes(4, "little")
    future = tmp_path / "future.gguf"
    future.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="version 99"):
        load_model(future)


def test_unsupported_gguf_architecture(tmp_path, cache):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    assert "'bert'" in str(err.value) and "llama" in str(err.value)


def test_unwritable_cache_falls_back_to_an_in_memory_load(tiny_gguf, tmp_path, monkeypatch):
    original, path = tiny_gguf
    blocked = tmp_path / "cache"
    blocked.mkdir()
    (blocked / "gguf").write_text("a file where the cache folder should be")
    monkeypatch.setenv("HOLDALL_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="HOLDALL_CACHE"):
        model, tokenizer = load_model(path)
    assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    assert tokenizer is not None and not getattr(model.config, "quantization_config", None)
