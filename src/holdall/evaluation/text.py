"""Text for evaluation: read a file, tokenize it once.

The GPTQ and AWQ papers score perplexity on the whole test split tokenized in one call and then cut into
fixed windows; tokenizing the text piecewise would change the token count (merges across line breaks, one
BOS per piece), so we keep that protocol exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from holdall.errors import DataError


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file, refusing missing, empty or non-UTF-8 files with a clear message.

    The text is returned as-is (no line joining or stripping) so token counts match whatever the file holds.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"text file not found: {path}. Pass an existing UTF-8 text file "
            f"(for example WikiText-2's test.txt)."
        )
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a UTF-8 text file inside it instead.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}). "
            f"Convert it first, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`."
        ) from exc
    if not text.strip():
        raise DataError(f"{path} is empty (or whitespace only); pass a file with text to score.")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize ``text`` in one call and return a 1-D ``LongTensor`` of token ids.

    Special tokens are whatever ``tokenizer(text)`` adds by default — the GPTQ/AWQ evaluation does exactly
    this. For Llama/Mistral tokenizers that is a single BOS at the very start of the text, so only the first
    evaluation window begins with BOS; SmolLM2 (GPT-2 style BPE) adds none. Either way each window is scored
    as the model sees it, and results stay comparable with the published tables.
    """
    if not isinstance(text, str):
        raise DataError(f"expected the text as a str, got {type(text).__name__}; read files with load_text().")
    if not text.strip():
        raise DataError("the text to tokenize is empty; pass a file or string with text to score.")
    # verbose=False: the whole test split is far longer than model_max_length, and the warning about it
    # is irrelevant here because we cut the ids into windows ourselves.
    encoded = tokenizer(text, return_tensors="pt", verbose=False)
    ids = encoded["input_ids"]
    if ids.dim() == 2:
        ids = ids[0]
    return ids.to(torch.long)
