"""Small data files shipped with holdall (WikiText-2 test/valid; see wikitext-2/README.md for the licence)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def wikitext2(split: str = "test") -> Path:
    """Path of the shipped WikiText-2 split: ``test`` for evaluation, ``valid`` for calibration."""
    if split not in ("test", "valid"):
        raise ValueError(f"unknown WikiText-2 split {split!r}; holdall ships 'test' and 'valid'")
    return DATA_DIR / "wikitext-2" / f"{split}.txt"
