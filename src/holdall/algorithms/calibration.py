"""Calibration data: which text, how many windows of how many tokens, sampled reproducibly.

GPTQ (and AWQ, later) look at the activations a model produces on a little real text. The recipe is the GPTQ
reference's: tokenize the whole text in one call, then draw ``n_samples`` random windows of ``seq_len`` tokens
with ``random.Random(seed).randrange(0, n_tokens - seq_len)`` per window. That is the same draw the GPTQ
reference (``random.seed(seed); random.randint(0, n - seq_len - 1)``) and this project's llm-compressor anchor
script (``random.seed(0); random.randrange(0, n - seq_len)``) make, so with the same tokenizer and seed the
windows are token-for-token the ones the published numbers were calibrated on.

The default text is the shipped WikiText-2 *valid* split: calibrating on the *test* split would leak the
evaluation text into the quantized weights.

Defaults per method (``register_method(..., calibration=(n_samples, seq_len))``): GPTQ 128 x 2048 (the paper),
AWQ 128 x 512. A CPU run of a small model does well with far fewer (the anchor protocol uses 32 x 512).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import wikitext2
from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration windows come from and how they are cut.

    text: path of a UTF-8 text file; None = the shipped WikiText-2 valid split.
    n_samples: number of windows; None = the method's default (GPTQ 128).
    seq_len: tokens per window; None = the method's default (GPTQ 2048).
    seed: seeds the window positions (same text + tokenizer + seed = same windows).
    batch_size: windows per decoder-layer forward while calibrating: memory vs speed only (results agree up to
        float summation order).
    device: where each decoder layer runs while it is calibrated (``"cuda"``, ``"cuda:1"``, ``"cpu"``); only one
        layer is there at a time. None = wherever the model already is.
    """

    text: str | None = None
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 8
    device: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:
            if isinstance(self.text, Path):
                object.__setattr__(self, "text", str(self.text))
            elif not isinstance(self.text, str):
                raise ConfigError(f"CalibrationConfig.text must be a file path, got {self.text!r}")
        for name, minimum in (("n_samples", 1), ("seq_len", 2)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < minimum):
                raise ConfigError(f"CalibrationConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"CalibrationConfig.seed must be an integer, got {self.seed!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"CalibrationConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.device is not None:
            if isinstance(self.device, torch.device):
                object.__setattr__(self, "device", str(self.device))
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"CalibrationConfig.device={self.device!r} is not a device; use e.g. 'cpu', 'cuda' or 'cuda:1'"
                ) from None

    def with_defaults(self, n_samples: int, seq_len: int) -> "CalibrationConfig":
        """This config with unset ``n_samples`` / ``seq_len`` filled in (a method's defaults)."""
        return dataclasses.replace(
            self,
            n_samples=self.n_samples if self.n_samples is not None else n_samples,
            seq_len=self.seq_len if self.seq_len is not None else seq_len,
        )

    @property
    def label(self) -> str:
        """``128x2048 wikitext-2 valid (seed 0)``."""
        source = Path(self.text).name if self.text else "wikitext-2 valid"
        return f"{self.n_samples}x{self.seq_len} {source} (seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationConfig":
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"a calibration config must be a dict (JSON object), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CalibrationConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive tokens at seeded random offsets: LongTensor ``[n, seq_len]``.

    ids: 1-D token ids of the whole text. Windows may overlap (they are drawn independently, as GPTQ does).
    """
    if ids.dim() != 1:
        raise DataError(f"expected 1-D token ids, got shape {tuple(ids.shape)}")
    n_tokens = ids.numel()
    if n_tokens < seq_len:
        raise DataError(
            f"the calibration text has {n_tokens} tokens, fewer than one window of {seq_len}; use a longer text "
            f"or a shorter seq_len (CLI: --calib-seq-len {max(2, n_tokens)} or less)"
        )
    rng = random.Random(seed)
    # randrange(0, 0) is an error: a text of exactly seq_len tokens has one possible window
    starts = [rng.randrange(0, n_tokens - seq_len) if n_tokens > seq_len else 0 for _ in range(n_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts]).to(torch.long)


def calibration_ids(config: CalibrationConfig, tokenizer: Any) -> torch.Tensor:
    """Read, tokenize (one call, as the GPTQ/AWQ evaluation does) and sample: LongTensor ``[n_samples, seq_len]``."""
    if config.n_samples is None or config.seq_len is None:
        raise ConfigError("the calibration config has no n_samples/seq_len; build it through QuantConfig")
    if tokenizer is None:
        raise ConfigError(
            "calibration needs the model's tokenizer to turn the calibration text into tokens; pass tokenizer= "
            "(or pre-tokenized calibration_data= [n_samples, seq_len] token ids)"
        )
    path = Path(config.text) if config.text else wikitext2("valid")
    ids = tokenize(tokenizer, read_text(path))
    return sample_windows(ids, config.n_samples, config.seq_len, config.seed)


def check_calibration_ids(ids: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Validate user-supplied calibration token ids: a 2-D integer tensor ``[n_samples, seq_len]``."""
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"calibration_data must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise DataError(f"calibration_data must be token ids shaped [n_samples, seq_len >= 2], got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DataError(f"calibration_data must hold integer token ids, got {ids.dtype}")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise DataError(
            f"calibration token ids span [{int(ids.min())}, {int(ids.max())}], outside the model's vocabulary "
            f"of {vocab_size}: the tokenizer does not belong to this model"
        )
    return ids.to(torch.long)


# --- text -----------------------------------------------------------------------------------------------
# evaluation/text.py has the same two steps, but algorithms/ may not import evaluation/ (same layer); these
# are the few lines calibration needs.
def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; missing, empty or non-UTF-8 files are a DataError naming the fix."""
    if not path.is_file():
        raise DataError(f"calibration text not found: {path}; pass an existing UTF-8 text file (CLI: --calib FILE)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"calibration text {path} is not valid UTF-8 (byte {exc.start}); convert it first") from None
    if not text.strip():
        raise DataError(f"calibration text {path} is empty; pass a file with text in it")
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text tokenized in one call: 1-D LongTensor (special tokens as the tokenizer adds by default)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return (ids[0] if ids.dim() == 2 else ids).to(torch.long)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
