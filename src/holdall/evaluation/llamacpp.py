"""Score a GGUF file with llama.cpp itself (through llama-cpp-python): perplexity and KL divergence vs a base.

The protocol is llama-perplexity's, so numbers sit beside llama.cpp's own: the text is tokenized once by the
file's tokenizer (no BOS), cut into non-overlapping ``n_ctx``-token chunks, the first token of a chunk becomes
BOS when the vocabulary adds one, and only the second half of each chunk is scored (positions
``n_ctx/2 .. n_ctx-2`` predicting the next token), so every scored token has at least ``n_ctx/2`` of context.
With a base file, KL(base || model) and top-1 agreement are computed on the same scored positions.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, MissingDependencyError, ModelNotFoundError
from ..models.files import check_gguf
from .perplexity import EvalResult


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(
            "scoring a GGUF file with llama.cpp needs llama-cpp-python: pip install 'holdall[llamacpp]' "
            "(it compiles llama.cpp, ~6 min), or pass --engine torch to dequantize the file with transformers"
        ) from None
    return llama_cpp


def _open(path: Path, n_ctx: int, threads: int | None):
    llama_cpp = _llama_cpp()
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}; check the path (holdall export MODEL --gguf TYPE -o FILE writes one)")
    check_gguf(path)  # a truncated or foreign file fails here with a clear message, not inside llama.cpp
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
        n_threads=threads, n_threads_batch=threads,
    )


def _chunks(llm, text: str, n_ctx: int, max_chunks: int | None) -> list[list[int]]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n = len(tokens) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise DataError(f"the text has {len(tokens)} tokens, fewer than one {n_ctx}-token chunk; use a longer text")
    bos = llm.token_bos() if _adds_bos(llm) else None
    chunks = []
    for c in range(n):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None and bos >= 0:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def _adds_bos(llm) -> bool:
    model = getattr(llm, "_model", None)
    return bool(model.add_bos_token()) if model is not None and hasattr(model, "add_bos_token") else False


def _log_probs(llm, chunk: list[int]) -> np.ndarray:
    """log-softmax of the scored positions: float64 [n_ctx/2 - 1, vocab]."""
    n_ctx = len(chunk)
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[n_ctx // 2:n_ctx - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))


def evaluate_gguf(
    path: str | Path,
    text: str,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    base_path: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    base_cache: dict | None = None,
) -> EvalResult:
    """Perplexity of the GGUF file at ``path`` on ``text`` with llama.cpp (and KLD vs ``base_path``).

    base_cache: a dict kept by the caller across calls that score several files against the same base: the
    base's log-probabilities are computed once per chunk and reused (float32 ``[n_ctx/2, vocab]`` per chunk:
    kept as float32, ~50 MB per chunk for a 49k vocabulary; the base's scoring is half the work of each call otherwise).
    """
    if n_ctx < 4 or n_ctx % 2:
        raise ConfigError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    llm = _open(Path(path), n_ctx, threads)
    base = None
    if base_path is not None:
        base_key = (str(Path(base_path).resolve()), os.path.getsize(base_path), n_ctx)
        cached = base_cache.get(base_key) if base_cache is not None else None
        if cached is None:
            cached = {"model": _open(Path(base_path), n_ctx, threads), "logp": {}}
            if base_cache is not None:
                base_cache[base_key] = cached
        base = cached["model"]
    chunks = _chunks(llm, text, n_ctx, max_chunks)
    if base is not None and base.n_vocab() != llm.n_vocab():
        raise ConfigError(f"{base_path} has {base.n_vocab()} tokens, {path} {llm.n_vocab()}: not the same model family")
    from tqdm import tqdm

    nll = kld = base_nll = 0.0
    agree = count = 0
    seconds = 0.0
    for chunk in tqdm(chunks, desc=f"llama.cpp {Path(path).name}", unit="chunk", disable=not progress):
        started = time.perf_counter()
        logp = _log_probs(llm, chunk)
        seconds += time.perf_counter() - started
        targets = np.asarray(chunk[n_ctx // 2 + 1:], dtype=np.int64)  # [n_ctx/2 - 1]
        rows = np.arange(len(targets))
        nll -= float(logp[rows, targets].sum())
        count += len(targets)
        if base is not None:
            key = tuple(chunk)
            base_logp = cached["logp"].get(key)
            if base_logp is None:
                base_logp = _log_probs(base, chunk)
                if base_cache is not None:  # kept as float32 (half the memory); every call then sees these values
                    cached["logp"][key] = base_logp.astype(np.float32)
            if base_cache is not None:
                base_logp = cached["logp"][key].astype(np.float64)
            base_nll -= float(base_logp[rows, targets].sum())
            kld += float((np.exp(base_logp) * (base_logp - logp)).sum())
            agree += int((base_logp.argmax(axis=1) == logp.argmax(axis=1)).sum())
    return EvalResult(
        ppl=math.exp(nll / count), nll=nll / count, n_tokens=count, n_windows=len(chunks), seq_len=n_ctx,
        kld_mean=kld / count if base is not None else None,
        top1_agreement=agree / count if base is not None else None,
        base_ppl=math.exp(base_nll / count) if base is not None else None, seconds=seconds,
    )
