"""Every artifact of a run, scored the same way: held-out loss on each customer's records, perplexity and KL
divergence on general text.

The held-out records are the ones fine-tuning held out (same data file, ``eval_fraction`` and seed), scored one
record at a time on response tokens only. The general text is cut into non-overlapping windows. KL divergence
is measured against a *reference*: the base model for a merged model (how far the adapter moved general
behaviour) and the customer's float merged model for a quantized artifact (what quantization cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..evaluation.perplexity import make_windows
from ..evaluation.scoring import Scorer, score_sequences
from ..evaluation.text import load_text, tokenize_text
from ..training.data import build_datasets
from .config import PipelineConfig

Sequences = list[tuple[list[int], list[int] | None]]


@dataclass
class EvalData:
    heldout: dict[str, Sequences]  # customer -> its held-out records (ids, labels)
    text: Sequences  # general-text windows (ids, None: every next token is scored)


def build_eval_data(config: PipelineConfig, tokenizer) -> EvalData:
    ft = config.finetune
    heldout = {}
    for customer in config.customers:
        data = build_datasets(customer.data, tokenizer, ft.max_len, packing=False,
                              eval_fraction=ft.eval_fraction, seed=ft.seed)
        heldout[customer.name] = [(ex.input_ids, ex.labels) for ex in data.eval]
    ids = tokenize_text(tokenizer, load_text(config.eval.text_path()))
    windows = make_windows(ids, config.eval.seq_len, config.eval.max_windows)
    return EvalData(heldout=heldout, text=[(w.tolist(), None) for w in windows])


class CachedScorer:
    """A reference scorer that remembers its log-probabilities of the general-text windows: one customer's float
    merged model is the KL reference of every artifact of that customer, on the same few windows.

    remember: the sequences worth keeping (the windows); at most ``budget_bytes`` of float32 ``[T, vocab]``
    tensors are kept, beyond that they are recomputed (a large vocabulary must not exhaust memory).
    """

    def __init__(self, scorer: Scorer, remember: set[tuple[int, ...]], budget_bytes: int = 1 << 30):
        self.scorer = scorer
        self.name = scorer.name
        self.remember = remember
        self.budget = budget_bytes
        self._memo: dict[tuple[int, ...], Any] = {}
        self._bytes = 0

    def log_probs(self, ids):
        key = tuple(ids)
        if key in self._memo:
            return self._memo[key]
        out = self.scorer.log_probs(ids)
        size = out.numel() * out.element_size()
        if key in self.remember and self._bytes + size <= self.budget:
            self._memo[key] = out
            self._bytes += size
        return out


class _Progress:
    """Wraps a scorer to tick a progress bar once per sequence scored."""

    def __init__(self, scorer: Scorer, bar):
        self.scorer, self.bar, self.name = scorer, bar, scorer.name

    def log_probs(self, ids):
        out = self.scorer.log_probs(ids)
        self.bar.update(1)
        return out


def score_artifact(scorer: Scorer, data: EvalData, reference: Scorer | None = None,
                   customers: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """``{"heldout": {customer: score}, "text": score}`` (each score a ``SequenceScore.to_dict()``).

    customers: whose held-out records to score (None: everyone's — the cross-customer matrix needs that for the
    merged models; a quantized artifact only needs its own customer's).
    """
    from tqdm import tqdm

    names = list(data.heldout) if customers is None else customers
    total = sum(len(data.heldout[n]) for n in names) + len(data.text)
    with tqdm(total=total, desc=f"scoring {scorer.name}", unit="seq", disable=not progress, leave=False) as bar:
        ticking = _Progress(scorer, bar)
        return {
            "heldout": {n: score_sequences(ticking, data.heldout[n]).to_dict() for n in names},
            "text": score_sequences(ticking, data.text, reference).to_dict(),
        }
