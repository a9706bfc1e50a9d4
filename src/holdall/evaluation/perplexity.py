"""Perplexity and KL divergence against a base model, with the GPTQ/AWQ evaluation protocol.

Protocol (GPTQ ``llama_eval`` / AWQ ``evaluate``): the whole text is tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens (the remainder that does not fill a window is dropped) and
each window is scored independently, with no context carried over. Inside a window every next-token
prediction counts: positions ``0 .. seq_len-2`` predict tokens ``1 .. seq_len-1``, so a window scores
``seq_len - 1`` tokens. ``PPL = exp(mean NLL over all scored tokens)``; since every window scores the same
number of tokens this equals the papers' ``exp(mean of per-window mean losses)``.

Against a base model (``base=``) the same windows and positions give the mean token-level
``KL(P_base || P_model)`` in nats, the top-1 agreement (both argmaxes equal) and the base's own perplexity,
the quantities llama.cpp's ``--kl-divergence`` reports. Logits are never stored beyond one window: the base
logits of the current window are computed once and shared by every model scored against them
(``evaluate_many``), and log-softmax runs in float32 over chunks of positions so the float32 temporaries
stay bounded (a full 2048 x 49152 window would be 400 MB per float32 copy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from holdall.errors import ConfigError, DataError
from holdall.evaluation.text import tokenize_text

# Bytes allowed for one float32 [positions, vocab] temporary while scoring; a few of them are live at once.
_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class EvalResult:
    """Perplexity of one model on one text, optionally compared with a base model on the same windows."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    n_tokens: int  # scored tokens: n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int
    kld_mean: float | None = None  # mean KL(P_base || P_model) per scored position, nats; None without base
    top1_agreement: float | None = None  # fraction of scored positions where both argmaxes agree
    base_ppl: float | None = None
    seconds: float = 0.0  # this model's forward passes and scoring (base forwards not included)

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(input_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut 1-D ids into non-overlapping ``[n_windows, seq_len]`` windows, dropping the incomplete tail."""
    if input_ids.dim() != 1:
        raise DataError(f"expected 1-D token ids, got shape {tuple(input_ids.shape)}; flatten them first.")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (one prediction needs two tokens), got {seq_len}.")
    n_windows = input_ids.numel() // seq_len
    if n_windows == 0:
        raise DataError(
            f"the text has {input_ids.numel()} tokens, fewer than one window of {seq_len}; "
            f"use a longer text file or a smaller --seq-len (at most {max(input_ids.numel(), 2)})."
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ConfigError(f"max_windows must be at least 1, got {max_windows}; omit it to score every window.")
        n_windows = min(n_windows, max_windows)
    return input_ids[: n_windows * seq_len].view(n_windows, seq_len)


def evaluate(
    model,
    tokenizer=None,
    text: str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    seq_len: int = 2048,
    max_windows: int | None = None,
    base_model=None,
    progress: bool = True,
    device=None,
) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (or pre-tokenized ``input_ids``); with ``base_model``, KL vs it.

    ``device``: when given, the model (and base) are moved there first; otherwise each runs where it is.
    """
    results = evaluate_many(
        {"model": model},
        tokenizer,
        text,
        input_ids=input_ids,
        base=base_model,
        seq_len=seq_len,
        max_windows=max_windows,
        progress=progress,
        device=device,
    )
    return results["model"]


def evaluate_many(
    models: Mapping[str, torch.nn.Module],
    tokenizer=None,
    text: str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    base=None,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    device=None,
) -> dict[str, EvalResult]:
    """Score several models on the same windows; the base's logits are computed once per window.

    Returns ``{name: EvalResult}`` in the order of ``models``. A model that *is* the base object is not run
    twice: its logits are the base's (its KL is then exactly 0).
    """
    if not models:
        raise ConfigError("evaluate_many needs at least one model to score.")
    ids = _resolve_ids(tokenizer, text, input_ids)
    all_models = dict(models) | ({"__base__": base} if base is not None else {})
    for name, model in all_models.items():
        _check_model_fits_window(name, model, seq_len)
        _check_vocab(name, model, ids)
    windows = make_windows(ids, seq_len, max_windows)

    if device is not None:
        for model in all_models.values():
            model.to(device)
    was_training = {name: model.training for name, model in all_models.items()}
    for model in all_models.values():
        model.eval()
    try:
        return _score_windows(models, base, windows, progress)
    finally:
        for name, model in all_models.items():
            model.train(was_training[name])


def _score_windows(models: Mapping[str, torch.nn.Module], base, windows: torch.Tensor, progress: bool):
    from tqdm import tqdm

    tallies = {name: _Tally() for name in models}
    base_tally = _Tally() if base is not None else None
    n_windows, seq_len = windows.shape
    with torch.inference_mode(), tqdm(
        total=n_windows * len(models), disable=not progress, desc="perplexity", unit="window"
    ) as bar:
        for w in range(n_windows):
            window = windows[w]
            base_logits = None
            if base is not None:
                base_logits = _window_logits(base, window)
                _score_one(base_tally, base_logits, window, None, "the base model", w)
            for name, model in models.items():
                start = time.perf_counter()
                # the base object itself is never run twice: its logits are the base's
                logits = base_logits if model is base else _window_logits(model, window)
                _score_one(tallies[name], logits, window, base_logits, f"model '{name}'", w)
                tallies[name].seconds += time.perf_counter() - start
                bar.update(1)
    base_ppl = _ppl(base_tally.mean_nll) if base_tally is not None else None
    return {name: tally.result(n_windows, seq_len, base_ppl) for name, tally in tallies.items()}


def _ppl(mean_nll: float) -> float:
    """exp(mean NLL); a broken model's NLL can exceed exp's float range, which reads as infinite perplexity."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


class _Tally:
    """Running sums for one model; float64 Python numbers so millions of tokens do not lose precision."""

    def __init__(self):
        self.nll_sum = 0.0
        self.kl_sum = 0.0
        self.agree = 0
        self.n_tokens = 0
        self.seconds = 0.0

    def add_nll(self, nll_sum: float, n_tokens: int) -> None:
        self.nll_sum += nll_sum
        self.n_tokens += n_tokens

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    def result(self, n_windows: int, seq_len: int, base_ppl: float | None) -> EvalResult:
        with_base = base_ppl is not None
        return EvalResult(
            ppl=_ppl(self.mean_nll),
            nll=self.mean_nll,
            n_tokens=self.n_tokens,
            n_windows=n_windows,
            seq_len=seq_len,
            kld_mean=self.kl_sum / self.n_tokens if with_base else None,
            top1_agreement=self.agree / self.n_tokens if with_base else None,
            base_ppl=base_ppl,
            seconds=self.seconds,
        )


def _score_one(tally, logits: torch.Tensor, window: torch.Tensor, base_logits, who: str, index: int) -> None:
    """Add one window's NLL (and KL / agreement vs the base) to the tally, chunk by chunk of positions."""
    n_scored = window.numel() - 1
    targets = window[1:].to(logits.device)
    # sums stay on the device and are read once per window: one sync per window, not per chunk
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    agree = torch.zeros((), dtype=torch.long, device=logits.device)
    for lo, hi in _chunks(n_scored, logits.shape[-1]):
        chunk = logits[lo:hi]
        if not torch.isfinite(chunk).all():
            raise DataError(
                f"{who} produced NaN/Inf logits on window {index} (tokens {index * window.numel()}.."
                f"{(index + 1) * window.numel() - 1}). The weights are likely broken (fp16 overflow or a bad "
                f"quantization); evaluate in bfloat16/float32 or re-quantize."
            )
        # float32 log-softmax: bf16/fp16 logits lose the small probabilities that KL and NLL depend on.
        logp = torch.log_softmax(chunk.float(), dim=-1)
        nll -= logp.gather(-1, targets[lo:hi, None]).sum(dtype=torch.float64)
        if base_logits is not None:
            base_logp = torch.log_softmax(base_logits[lo:hi].to(logits.device).float(), dim=-1)
            # KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), P = base, Q = model.
            kl += (base_logp.exp() * (base_logp - logp)).sum(dtype=torch.float64)
            agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum()
    tally.add_nll(nll.item(), n_scored)
    tally.kl_sum += kl.item()
    tally.agree += int(agree.item())


def _chunks(n_positions: int, vocab: int):
    step = max(1, _CHUNK_BYTES // (4 * vocab))
    for lo in range(0, n_positions, step):
        yield lo, min(lo + step, n_positions)


def _window_logits(model, window: torch.Tensor) -> torch.Tensor:
    """Logits ``[seq_len, vocab]`` of one window, on the model's device."""
    ids = window.to(_model_device(model))[None, :]
    # use_cache=False: scoring needs no KV cache, and HF would otherwise allocate one per window.
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits[0]


def _model_device(model) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():  # fully quantized modules may hold only buffers
        return tensor.device
    return torch.device("cpu")


def _resolve_ids(tokenizer, text: str | None, input_ids: torch.Tensor | None) -> torch.Tensor:
    if input_ids is not None:
        if text is not None:
            raise ConfigError("pass either text or input_ids, not both.")
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        return ids.to(torch.long)
    if text is None:
        raise ConfigError("nothing to score: pass text (with a tokenizer) or input_ids.")
    if tokenizer is None:
        raise ConfigError("text needs a tokenizer to be scored; pass tokenizer= (or pre-tokenized input_ids=).")
    return tokenize_text(tokenizer, text)


def _check_model_fits_window(name: str, model, seq_len: int) -> None:
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise DataError(
            f"seq_len {seq_len} exceeds the max_position_embeddings ({max_pos}) of "
            f"{'the base model' if name == '__base__' else repr(name)}; pass --seq-len {max_pos} or less."
        )


def _check_vocab(name: str, model, ids: torch.Tensor) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise DataError(
            f"token id {int(ids.max())} is outside the vocabulary ({vocab}) of "
            f"{'the base model' if name == '__base__' else repr(name)}: the tokenizer does not belong to this "
            f"model. Use the model's own tokenizer."
        )


def format_result(result: EvalResult, name: str | None = None) -> str:
    """A few readable lines for one result (the text behind ``holdall eval``)."""
    title = f"{name}: " if name else ""
    lines = [
        f"{title}perplexity {result.ppl:.4f}  (mean NLL {result.nll:.4f} nats over {result.n_tokens:,} tokens; "
        f"{result.n_windows} windows x {result.seq_len}, remainder dropped)"
    ]
    if result.kld_mean is not None:
        lines.append(
            f"  vs base: KL(base||model) {result.kld_mean:.5f} nats/token, top-1 agreement "
            f"{100 * result.top1_agreement:.2f}%, base perplexity {result.base_ppl:.4f} "
            f"(ΔPPL {result.ppl - result.base_ppl:+.4f})"
        )
    lines.append(f"  time: {result.seconds:.1f} s")
    return "\n".join(lines)


def format_results(results: Mapping[str, EvalResult]) -> str:
    """A table for several models scored on the same windows (``evaluate_many``)."""
    rows = list(results.items())
    if not rows:
        return "(no results)"
    width = max(10, *(len(name) for name, _ in rows))
    first = rows[0][1]
    header = f"{'model':<{width}}  {'PPL':>10}  {'ΔPPL':>9}  {'KL(base||m)':>11}  {'top-1':>7}  {'time s':>7}"
    out = [
        f"{first.n_windows} windows x {first.seq_len} tokens ({first.n_tokens:,} scored per model)"
        + (f"; base perplexity {first.base_ppl:.4f}" if first.base_ppl is not None else ""),
        header,
        "-" * len(header),
    ]
    for name, r in rows:
        with_base = r.base_ppl is not None
        delta = f"{r.ppl - r.base_ppl:+9.4f}" if with_base else f"{'-':>9}"
        kl = f"{r.kld_mean:11.5f}" if with_base else f"{'-':>11}"
        top1 = f"{100 * r.top1_agreement:6.2f}%" if with_base else f"{'-':>7}"
        out.append(f"{name:<{width}}  {r.ppl:10.4f}  {delta}  {kl}  {top1}  {r.seconds:7.1f}")
    return "\n".join(out)
