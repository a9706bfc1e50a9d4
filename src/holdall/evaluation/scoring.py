"""Score any artifact — a torch model, or a GGUF file run by llama.cpp — on the same token sequences.

A deployment pipeline compares artifacts of different formats (a merged float model, a holdall int4
directory, a Q4_K_M GGUF file, an NF4 base with an adapter) on one footing. Each is wrapped as a *scorer*
that returns next-token log-probabilities for a sequence of token ids; held-out loss (on response tokens
only), perplexity and KL divergence against a reference are then computed by the same code for all of them.

Token ids are given, never text: every artifact of one base shares its vocabulary, so the same ids mean the
same thing to transformers and to llama.cpp, and tokenizer differences cannot leak into the comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch

from ..errors import ConfigError, DataError

IGNORE_INDEX = -100  # a label that is not scored (prompt tokens, padding), the transformers convention


class Scorer(Protocol):
    """Something that turns token ids ``[T]`` into next-token log-probabilities ``[T, vocab]`` (float32)."""

    name: str

    def log_probs(self, ids: Sequence[int]) -> torch.Tensor: ...


class TorchScorer:
    """A causal LM in memory (float, holdall-quantized, or with an active LoRA adapter)."""

    def __init__(self, model: torch.nn.Module, name: str = "model"):
        self.model = model.eval()
        self.name = name

    @torch.inference_mode()
    def log_probs(self, ids: Sequence[int]) -> torch.Tensor:
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        batch = torch.as_tensor(list(ids), dtype=torch.long, device=device)[None, :]
        logits = self.model(input_ids=batch, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


class LlamaCppScorer:
    """A GGUF file, run by llama.cpp itself (through llama-cpp-python): what users of the file will get."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, name: str | None = None):
        from .llamacpp import _open  # lazy: llama-cpp-python is optional

        self.path = Path(path)
        self.n_ctx = n_ctx
        self.name = name or self.path.name
        self.llm = _open(self.path, n_ctx, threads)

    def log_probs(self, ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        if len(ids) > self.n_ctx:
            raise ConfigError(f"{self.name}: a {len(ids)}-token sequence does not fit n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        logits = torch.from_numpy(self.llm.scores[: len(ids)].copy()).float()
        return torch.log_softmax(logits, dim=-1)


@dataclass
class SequenceScore:
    """Mean negative log-likelihood per scored token (and, with a reference, KL(reference || model))."""

    nll: float
    n_tokens: int
    n_sequences: int
    kld_mean: float | None = None
    top1_agreement: float | None = None
    reference_nll: float | None = None

    @property
    def ppl(self) -> float:
        try:
            return math.exp(self.nll)
        except OverflowError:
            return math.inf

    def to_dict(self) -> dict:
        return asdict(self) | {"ppl": self.ppl}


def scored_positions(ids: Sequence[int], labels: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)``: position ``t`` predicts ``labels[t + 1]`` where that label is scored.

    labels: aligned with ``ids`` (the transformers convention: the model shifts them), ``IGNORE_INDEX`` where
    a token is not scored; None scores every next token.
    """
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    labels_t = ids_t if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
    if labels_t.shape != ids_t.shape:
        raise DataError(f"labels ({labels_t.numel()}) and ids ({ids_t.numel()}) differ in length")
    next_labels = labels_t[1:]
    positions = torch.nonzero(next_labels != IGNORE_INDEX).flatten()
    return positions, next_labels[positions]


def score_sequences(
    scorer: Scorer,
    sequences: Iterable[tuple[Sequence[int], Sequence[int] | None]],
    reference: Scorer | None = None,
) -> SequenceScore:
    """Token-mean NLL of ``scorer`` over ``(ids, labels)`` sequences; with ``reference``, KL and top-1 agreement
    against it on the same scored positions."""
    nll = kld = ref_nll = 0.0
    agree = count = n_seq = 0
    for ids, labels in sequences:
        positions, targets = scored_positions(ids, labels)
        if positions.numel() == 0:
            continue
        logp = _checked(scorer, ids)[positions]
        nll -= float(logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
        if reference is not None:
            ref = _checked(reference, ids)[positions]
            ref_nll -= float(ref.gather(1, targets[:, None]).sum(dtype=torch.float64))
            kld += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
            agree += int((ref.argmax(1) == logp.argmax(1)).sum())
        count += positions.numel()
        n_seq += 1
    if count == 0:
        raise DataError(f"no scored token in the sequences given to {scorer.name}; check the labels")
    with_ref = reference is not None
    return SequenceScore(
        nll=nll / count, n_tokens=count, n_sequences=n_seq,
        kld_mean=kld / count if with_ref else None, top1_agreement=agree / count if with_ref else None,
        reference_nll=ref_nll / count if with_ref else None,
    )


def _checked(scorer: Scorer, ids: Sequence[int]) -> torch.Tensor:
    logp = scorer.log_probs(ids)
    if logp.dim() != 2 or logp.shape[0] != len(ids):
        raise ConfigError(f"{scorer.name} returned log-probs of shape {tuple(logp.shape)} for {len(ids)} tokens")
    if not torch.isfinite(logp).any(dim=-1).all():
        raise DataError(
            f"{scorer.name} produced NaN/-inf at every vocabulary entry of some position: the weights are likely "
            "broken (fp16 overflow or a bad quantization); re-create the artifact from the float model"
        )
    return logp
