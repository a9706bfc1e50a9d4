"""Shared fixtures: tiny random-weight models of real architectures, built in the test (no hub access)."""

from __future__ import annotations

import json

import os
from pathlib import Path

import pytest
import torch

# Two cores are shared by everything on CI machines; oversubscribing them only slows tests down.
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = (
    "the quick brown fox jumps over a lazy dog while three customers each want their own model "
    "quantization packs weights into fewer bits and adapters tailor behaviour"
).split()


def make_tiny_tokenizer():
    """A small word-level tokenizer (with BOS/EOS) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 128, tie: bool = False, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=kw.pop("intermediate", 2 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=kw.pop("heads", 4),
        num_key_value_heads=kw.pop("kv_heads", 2),
        vocab_size=vocab,
        max_position_embeddings=kw.pop("max_position", 256),
        tie_word_embeddings=tie,
        **kw,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids thread hand-offs that dominate on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a normal Hugging Face directory with a tokenizer."""
    model = make_tiny_llama()
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_text_file(tmp_path: Path) -> Path:
    rng = torch.Generator().manual_seed(0)
    idx = torch.randint(len(WORDS), (3000,), generator=rng).tolist()
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(WORDS[i] for i in idx))
    return path


# The small instruction/prompt/chat mix the finetune tests train on (every record format the loader reads).
FINETUNE_RECORDS = [
    {"prompt": "the quick brown fox", "response": "jumps over a lazy dog"},
    {"prompt": "three customers each want", "response": "their own model"},
    {"instruction": "quantization packs weights", "output": "into fewer bits"},
    {"messages": [{"role": "user", "content": "a lazy dog"}, {"role": "assistant", "content": "adapters tailor behaviour"}]},
] * 3


@pytest.fixture
def finetune_data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FINETUNE_RECORDS))
    return path
