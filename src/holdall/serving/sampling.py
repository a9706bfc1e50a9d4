"""Per-request sampling and the text a request streams out.

``SamplingParams`` is what one request asks for; ``sample_rows`` picks the next token of every batch row with
that row's own parameters and random generator (so a seeded request draws the same tokens whatever it is
batched with); ``TextStream`` turns generated token ids into text deltas, holding back what may still become
a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from holdall.errors import ConfigError

MAX_STOP_STRINGS = 4  # OpenAI's limit
_CONTEXT_TOKENS = 4  # prompt tokens decoded in front of the output, so the first word keeps its leading space


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_p keeps the smallest set of tokens whose probability reaches it.

    stop: strings that end the output (not included in it). seed: a private generator per request; None
    draws a fresh random seed.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator(device=device).manual_seed(seed)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row. logits: ``[B, vocab]``; row i uses ``params[i]`` and ``generators[i]``."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()  # one batched argmax covers every greedy row
    return [greedy[i] if p.greedy else _sample_one(logits[i], p, g)
            for i, (p, g) in enumerate(zip(params, generators))]


def _sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, then nucleus (top-p) filtering, then one draw from the row's own generator."""
    probs = torch.softmax(logits / params.temperature, dim=-1)  # [vocab]
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token if the mass before it is still below top_p (the most likely token is always kept)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class TextStream:
    """Generated ids -> text deltas, with stop strings cut and partial characters held back.

    Each call to :meth:`push` returns the new text that is safe to send. Text is decoded from a few prompt
    tokens plus the output, minus the prompt part: tokenizers that drop a leading space at the start of a
    decode (SentencePiece) would otherwise glue the first word to the prompt.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._context_text = self._decode(self._context)
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found; ``text`` ends just before it

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def full_text(self) -> str:
        text = self._decode(self._context + self.ids)
        if text.startswith(self._context_text):
            return text[len(self._context_text):]
        return self._decode(self.ids)  # the prompt's tail merged with the output: decode the output alone

    def push(self, token_id: int | None) -> str:
        """Add one generated token (None: nothing new, e.g. EOS, which is not text) and return the new text."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self.full_text()
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        safe = len(text) - _held_back(text, self.stop)
        return self._emit(text[:safe])

    def finish(self) -> str:
        """Everything not yet sent (held-back text becomes final once generation ends)."""
        text = self.full_text()
        cut = _first_stop(text, self.stop)
        return self._emit(text if cut is None else text[:cut])

    @property
    def text(self) -> str:
        return self.sent

    def _emit(self, text: str) -> str:
        # A decode may rewrite earlier characters (rare: a merge across the boundary); never send them twice.
        if not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that must wait: an incomplete character or the start of a stop string."""
    if text.endswith("\ufffd"):  # the tokenizer's replacement for a UTF-8 sequence still being generated
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest
