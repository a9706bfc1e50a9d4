"""Shared by the GGUF export tests: llama.cpp (llama-cpp-python) as the reference, tiny models and tokenizers
built offline.

Skipping follows ``ggml_ref.require_ggml``: a missing llama-cpp-python skips, unless HOLDALL_REQUIRE_LLAMA_CPP=1.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import torch
from ggml_ref import require_ggml

from holdall.data import wikitext2
from holdall.formats.gguf import quants


def require_llama_cpp():
    require_ggml()
    import llama_cpp

    return llama_cpp


def holdall_encoders() -> set[str]:
    """The ggml types holdall's encoders handle (an import error in an encoder module fails loudly here)."""
    quants._load_families()
    return set(quants.ENCODERS)


def need_encoders(*types: str) -> None:
    """Every type llama.cpp's file types use has an encoder; a missing one is a failure, never a skip."""
    missing = sorted(set(types) - holdall_encoders())
    assert not missing, f"holdall has no encoder for {', '.join(missing)}"


# ----------------------------------------------------------------------------------------- models


def tiny_llama(hidden=256, layers=2, vocab=1000, heads=8, kv_heads=2, intermediate=512, tie=False, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=kw.pop("max_position", 256),
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **kw,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(vocab=49152, tie=True, seed=0):
    """A 2-layer Qwen2 whose q/k/v biases are large enough to matter (they are zeros at init)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


# ------------------------------------------------------------------------------------- tokenizers


def train_spm(folder: Path, vocab_size: int = 1000) -> Path:
    """A Llama-style SentencePiece BPE model (byte fallback, dummy prefix) trained on WikiText-2 in ~0.1 s."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(Path(wikitext2("valid")).read_text()[:200_000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2, num_threads=1,
    )
    return folder / "spm.model"


def hf_tokenizer_from_spm(model_file: Path):
    """A transformers fast tokenizer equivalent to the SentencePiece model (Llama 2's tokenizer.json layout).

    transformers can only convert .model files with protobuf installed; this builds the same BPE directly:
    every split of a piece into two pieces is a merge, ranked by the merged piece's id (SentencePiece order).
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    merges = []
    for piece, piece_id in vocab.items():
        if sp.IsControl(piece_id) or sp.IsUnknown(piece_id) or sp.IsByte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# -------------------------------------------------------------------------------------- llama.cpp


def llama_model(path: Path, n_ctx: int = 128):
    """A llama_cpp.Llama with a float32 KV cache: the default F16 cache alone moves logits by ~1e-3.

    One thread: ggml's workers spin-wait, and on a busy 2-core machine two of them turn 10 ms into seconds.
    """
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, n_threads=1, n_threads_batch=1,
    )


def llama_logits(path: Path, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    llm = llama_model(path, n_ctx)
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


_FALLBACK_LINE = re.compile(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback")


def llama_quantize(src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> int:
    """Run ``llama_model_quantize`` (what llama-quantize runs); return its count of shape fallbacks.

    llama.cpp's log is captured instead of printed: its fallback warning is the only place the count appears.
    """
    llama_cpp = require_llama_cpp()
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1  # the bytes do not depend on it; the shared 2-core machine does
    keep = []  # the imatrix buffers must outlive the call
    if imatrix:
        table = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(array)
            table[i].name = name.encode()
            table[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[i].size = array.size
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(table)
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    assert status == 0, "".join(lines)[-2000:]
    match = _FALLBACK_LINE.search("".join(lines))
    return int(match.group(1)) if match else 0


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """(metadata as Python values, {tensor name: (type name, ne shape, raw bytes)}), via gguf.GGUFReader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own counts, not metadata
            continue
        fields[key] = field.contents()
    tensors = {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(t.data.tobytes())) for t in reader.tensors
    }
    return fields, tensors


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_fast(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """Same result as :func:`read_gguf`, parsed straight from the bytes (GGUF v3, gguf.md section 1).

    GGUFReader spends ~6 s on a 49k-token vocabulary (a numpy view per string); a plain struct walk takes
    a fraction of a second, and doubles as an independent check of the layout holdall writes.
    """
    import struct

    from holdall.formats.gguf.quants import TYPE_BY_ID, TYPES

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n : pos].decode("utf-8")

    def value(vtype: int):
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("<I"), take("<Q")
            return [value(etype) for _ in range(n)]
        return take(_SCALARS[vtype])

    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    pos = 8
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(take("<Q") for _ in range(take("<I")))
        infos.append((name, shape, take("<I"), take("<Q")))
    align = fields.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, shape, type_id, offset in infos:
        type_name = TYPE_BY_ID[type_id]
        _, block, size = TYPES[type_name]
        nbytes = int(np.prod(shape)) // block * size
        tensors[name] = (type_name, shape, data[start + offset : start + offset + nbytes])
    return fields, tensors
