"""Reading and tokenizing evaluation text."""

from __future__ import annotations

import pytest
import torch

from holdall.errors import DataError
from holdall.evaluation import load_text, tokenize_text

from holdall.data import wikitext2

WIKITEXT = wikitext2("test")  # shipped with the package


def test_load_text_roundtrip(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" = Title = \n\n café \n", encoding="utf-8")
    assert load_text(path) == " = Title = \n\n café \n"  # returned as-is


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        load_text(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8.*iconv"):
        load_text(latin)
    with pytest.raises(DataError, match="directory"):
        load_text(tmp_path)


def test_tokenize_text_with_a_real_fast_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<s>": 0, "<unk>": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>",
                                                model_max_length=4)
    ids = tokenize_text(fast, "hello world hello there world")
    assert ids.dtype == torch.long and ids.dim() == 1
    # one BOS for the whole text (what tokenizer(text) gives), longer than model_max_length is fine
    assert ids.tolist() == [0, 2, 3, 2, 1, 3]


def test_tokenize_text_rejects_empty():
    with pytest.raises(DataError, match="empty"):
        tokenize_text(lambda text, **kw: None, "   ")


def test_wikitext_loads():
    text = load_text(WIKITEXT)
    assert len(text) > 1_000_000 and "Robert" in text[:100]
