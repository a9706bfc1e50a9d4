"""A transformers tokenizer as llama.cpp stores it: the ``tokenizer.ggml.*`` keys of a GGUF file.

llama.cpp re-implements tokenization itself, so the file must describe the tokenizer completely:

* byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2) -> ``tokenizer.ggml.model = "gpt2"`` with the token
  strings, their types, the merges and ``tokenizer.ggml.pre``, the name of the pre-tokenizer regex llama.cpp
  should apply. transformers does not name its pre-tokenizer, so, like convert_hf_to_gguf.py, holdall
  tokenizes a fixed probe text and looks the hash of the ids up in a table of known tokenizers.
* SentencePiece (Llama 1/2, Mistral, TinyLlama) -> ``"llama"`` with pieces, scores and types. Scores come from
  the SentencePiece model when the tokenizer has one, else from the tokenizer.json: Unigram scores as given,
  BPE merge ranks turned into scores (llama.cpp merges the highest-scoring pair first, BPE the lowest rank).

Special-token ids, whether BOS/EOS are added, the space prefix and the chat template are read from what the
tokenizer *does* (it encodes a probe), not from config flags that fine-tunes often leave stale.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import DataError, UnsupportedModelError

# llama.cpp token types (gguf.TokenType / llama_token_attr in the file).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE_MARK = "\u2581"  # SentencePiece's visible space
_ADDED_TOKEN_SCORE = -1000.0  # convert_hf_to_gguf.py's score for added tokens in a SentencePiece vocab

# convert_hf_to_gguf.py's probe text: whitespace runs, emoji, digits, CJK, contractions. The sha256 of
# str(tokenizer.encode(_PRE_PROBE)) identifies the pre-tokenizer; it must stay byte for byte the same.
_PRE_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of the probe's ids -> llama.cpp pre-tokenizer name, for the families holdall exports
# (hashes from convert_hf_to_gguf.py's get_vocab_base_pre).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3 (llama arch)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
}


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize like the original tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # BPE only: "left right" per merge, in rank order
    special_ids: dict[str, int] | None = None  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None


# ------------------------------------------------------------------------------------------ entry points


def vocab_from_tokenizer(tokenizer, n_vocab: int, config=None) -> GGUFVocab:
    """The GGUF vocabulary of a transformers tokenizer, padded to the model's ``n_vocab`` embedding rows."""
    if tokenizer is None:
        raise DataError(
            "GGUF files carry the tokenizer, and none was given: pass tokenizer= (or export from a model "
            "directory / hub id that ships one)"
        )
    tokenizer_json = _tokenizer_json(tokenizer)
    sp_model = _sentencepiece_model(tokenizer)
    if sp_model is not None or (tokenizer_json is not None and _is_sentencepiece_style(tokenizer_json)):
        vocab = _spm_vocab(tokenizer, tokenizer_json, sp_model, n_vocab)
    elif tokenizer_json is not None and _is_byte_level(tokenizer_json):
        vocab = _bpe_vocab(tokenizer, tokenizer_json, n_vocab)
    else:
        kind = tokenizer_json["model"]["type"] if tokenizer_json else type(tokenizer).__name__
        raise UnsupportedModelError(
            f"cannot describe this tokenizer ({kind}) to llama.cpp: GGUF export handles byte-level BPE "
            "(GPT-2 / Llama 3 / Qwen2 / SmolLM style) and SentencePiece (Llama 2 / Mistral style) tokenizers"
        )
    vocab.special_ids = _special_ids(tokenizer, config, n_vocab)
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tokenizer, vocab.special_ids)
    if vocab.model == "llama":
        vocab.add_space_prefix = _adds_space_prefix(tokenizer)
    elif isinstance(getattr(tokenizer, "add_prefix_space", None), bool):
        vocab.add_space_prefix = tokenizer.add_prefix_space
    vocab.chat_template = getattr(tokenizer, "chat_template", None) or None
    return vocab


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Write the ``tokenizer.ggml.*`` keys (and the chat template)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in (vocab.special_ids or {}).items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):  # several named templates -> GGUF's list of {name, template}
            template = [{"name": name, "template": text} for name, text in template.items()]
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------ tokenizer kinds


def _tokenizer_json(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _sentencepiece_model(tokenizer):
    """The tokenizer's SentencePiece model (a SentencePieceProcessor), when it has one."""
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None:
        return sp_model
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if not vocab_file or not str(vocab_file).endswith(".model") or not Path(vocab_file).is_file():
        return None
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # fall back to the tokenizer.json
        return None
    return SentencePieceProcessor(model_file=str(vocab_file))


def _components(node: dict | None, key: str) -> list[dict]:
    """A pre-tokenizer / normalizer / decoder and the parts of a Sequence of them, flattened."""
    if not node:
        return []
    parts = node.get(key)
    return [part for child in parts for part in _components(child, key)] if parts else [node]


def _is_byte_level(tokenizer_json: dict) -> bool:
    pre = _components(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    return tokenizer_json["model"]["type"] == "BPE" and any(p.get("type") == "ByteLevel" for p in pre)


def _is_sentencepiece_style(tokenizer_json: dict) -> bool:
    model = tokenizer_json["model"]
    if model["type"] == "Unigram":
        return True
    pre = _components(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    normalizers = _components(tokenizer_json.get("normalizer"), "normalizers")
    marks_spaces = any(p.get("type") == "Metaspace" for p in pre) or any(
        n.get("type") == "Replace" and n.get("content") == _SPACE_MARK for n in normalizers
    )
    return model["type"] == "BPE" and (marks_spaces or bool(model.get("byte_fallback")))


# ------------------------------------------------------------------------------------ token tables


def _id_table(tokenizer, n_vocab: int) -> list[str | None]:
    """Token string of every id below ``n_vocab`` (None where the tokenizer has no token)."""
    vocab = tokenizer.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= n_vocab:
        raise DataError(
            f"the tokenizer has token ids up to {top}, but the model's embedding has only {n_vocab} rows; "
            "pass the tokenizer the model was trained with"
        )
    table: list[str | None] = [None] * n_vocab
    for token, token_id in vocab.items():
        table[token_id] = token
    return table


def _looks_special(text: str) -> bool:
    # Added tokens some models forget to flag as special (convert_hf_to_gguf.py's does_token_look_special).
    return (
        text in ("<pad>", "<mask>")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_type(added) -> int:
    return CONTROL if added.special or _looks_special(added.content) else USER_DEFINED


def _bpe_vocab(tokenizer, tokenizer_json: dict, n_vocab: int) -> GGUFVocab:
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id, token in enumerate(_id_table(tokenizer, n_vocab)):
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        types.append(_added_type(added[token_id]) if token_id in added else NORMAL)
    return GGUFVocab("gpt2", _pre_tokenizer(tokenizer), tokens, types, merges=_merges(tokenizer_json))


def _merges(tokenizer_json: dict) -> list[str]:
    merges = tokenizer_json["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):
        # transformers >= 4.45 stores pairs (to allow spaces inside a part); GGUF wants "left right" strings,
        # so a literal space inside a part becomes its byte-level stand-in U+0120, as gguf.SpecialVocab does.
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def _pre_tokenizer(tokenizer) -> str:
    ids = tokenizer.encode(_PRE_PROBE)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise UnsupportedModelError(
            f"this BPE tokenizer's pre-tokenizer is not one llama.cpp is known to implement (probe hash "
            f"{digest}); llama.cpp would split text differently from transformers. Known: "
            f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}. Export a model with one of these tokenizers, "
            "or add its hash to holdall.formats.gguf.vocab.PRE_TOKENIZERS after checking llama.cpp supports it."
        )
    return name


def _spm_vocab(tokenizer, tokenizer_json: dict | None, sp_model, n_vocab: int) -> GGUFVocab:
    if sp_model is not None:
        tokens, scores, types = _pieces_from_sentencepiece(sp_model, n_vocab)
    else:
        tokens, scores, types = _pieces_from_tokenizer_json(tokenizer, tokenizer_json, n_vocab)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id >= n_vocab:
            continue  # _id_table already refused ids beyond the embedding
        kind = _added_type(added)
        # llama.cpp treats user-defined tokens as already normalized: spell their spaces as spaces.
        text = added.content if kind == CONTROL else added.content.replace(_SPACE_MARK, " ")
        if types[token_id] in (UNKNOWN, BYTE):
            continue  # <unk> and byte pieces keep their SentencePiece type even when listed as added
        tokens[token_id], scores[token_id], types[token_id] = text, _ADDED_TOKEN_SCORE, kind
    return GGUFVocab("llama", "default", tokens, types, scores=scores)


def _padded(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    return [f"[PAD{i}]" for i in range(n_vocab)], [-10000.0] * n_vocab, [UNUSED] * n_vocab


def _pieces_from_sentencepiece(sp_model, n_vocab: int):
    tokens, scores, types = _padded(n_vocab)
    if sp_model.vocab_size() > n_vocab:
        raise DataError(
            f"the SentencePiece model has {sp_model.vocab_size()} pieces but the model's embedding only "
            f"{n_vocab} rows; pass the tokenizer the model was trained with"
        )
    for i in range(sp_model.vocab_size()):
        tokens[i] = sp_model.IdToPiece(i)
        scores[i] = float(sp_model.GetScore(i))
        if sp_model.IsUnknown(i):
            types[i] = UNKNOWN
        elif sp_model.IsControl(i):
            types[i] = CONTROL
        elif sp_model.IsUnused(i):
            types[i] = UNUSED
        elif sp_model.IsByte(i):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    return tokens, scores, types


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pieces_from_tokenizer_json(tokenizer, tokenizer_json: dict, n_vocab: int):
    tokens, scores, types = _padded(n_vocab)
    model = tokenizer_json["model"]
    if model["type"] == "Unigram":
        given = {piece: float(score) for piece, score in model["vocab"]}
    else:
        given = _scores_from_merges(model)
    unk_id = tokenizer.unk_token_id
    for token_id, token in enumerate(_id_table(tokenizer, n_vocab)):
        if token is None:
            continue
        tokens[token_id] = token
        scores[token_id] = given.get(token, 0.0)
        if token_id == unk_id:
            types[token_id] = UNKNOWN
        elif _BYTE_PIECE.fullmatch(token):
            types[token_id] = BYTE
        else:
            types[token_id] = NORMAL
    return tokens, scores, types


def _scores_from_merges(model: dict) -> dict[str, float]:
    """SentencePiece-style scores for a BPE vocab: the token made by merge rank r scores -r.

    llama.cpp's SentencePiece tokenizer repeatedly merges the adjacent pair whose merged token has the highest
    score; BPE applies the lowest-rank merge first. Negated ranks make the two agree. Tokens no merge makes
    (single characters, bytes, specials) are never the result of a merge, so their score does not matter.
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


# ------------------------------------------------------------------------------------ behaviour probes

_PROBE = "Hello world"


def _special_ids(tokenizer, config, n_vocab: int) -> dict[str, int]:
    """bos / eos / unk / pad ids: the tokenizer's, else the model config's."""
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None and config is not None:
            token_id = getattr(config, f"{kind}_token_id", None)
            if isinstance(token_id, (list, tuple)):  # some configs list several eos ids; llama.cpp takes one
                token_id = token_id[0] if token_id else None
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            ids[kind] = token_id
    return ids


def _adds_bos_eos(tokenizer, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether ``encode`` (with special tokens, as llama.cpp's add_special) puts BOS first / EOS last."""
    plain = tokenizer.encode(_PROBE, add_special_tokens=False)
    full = tokenizer.encode(_PROBE)
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1 : 1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain) : -1] == plain
    return add_bos, add_eos


def _adds_space_prefix(tokenizer) -> bool:
    """SentencePiece's dummy prefix: does "a" tokenize as if it were " a"?"""
    ids = tokenizer.encode("a", add_special_tokens=False)
    first = tokenizer.convert_ids_to_tokens(ids[:1])
    return bool(first) and first[0].startswith(_SPACE_MARK)
