"""Fine-tuning data: JSONL instruction/chat records or plain text -> token sequences with loss masks.

Formats (one JSON object per line of a ``.jsonl``/``.json`` file; blank lines are skipped):

* instruction: ``{"instruction": ..., "input": ... (optional), "output": ...}`` or
  ``{"prompt": ..., "response": ...}`` / ``{"prompt": ..., "completion": ...}``;
  treated as a two-turn chat (user: instruction + blank line + input; assistant: output);
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

A plain ``.txt`` file is a set of documents separated by blank lines; every token is trained on.

Rendering: with the tokenizer's chat template when it has one; otherwise the simple template
(:data:`SIMPLE_TEMPLATE`): BOS, then per turn ``"### {Role}:\\n{content}\\n\\n"``, each assistant turn
ending with EOS instead of the blank line. Loss is only on assistant turns (labels are ``-100`` on system/
user text and on the template's scaffolding before each response). Each turn is tokenized as its own
piece, exactly as inference sees a prompt and then generates after it.

Packing (``packing=True``): the examples, each ending with EOS, are concatenated into one stream cut into
``max_len`` windows. Attention is *not* masked between packed examples (no cross-document mask: the EOS
separates them, as in most SFT packing); the first token of each example gets label ``-100`` so no loss is
spent predicting one example from the end of another.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DataError

IGNORE_INDEX = -100
#: the fallback chat rendering for tokenizers without a chat template (see the module docstring)
SIMPLE_TEMPLATE = "### {role}:\n{content}\n\n"
_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One token sequence: ``input_ids`` and ``labels`` (same length; ``-100`` = no loss)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# --- reading records -------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """``[(line_number, messages)]`` from a JSONL file of instruction or chat records (1-based line numbers)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
            records.append((lineno, record_to_messages(obj, f"{path}, line {lineno}")))
    if not records:
        raise DataError(f"{path} has no records; expected one JSON object per line (instruction or chat format)")
    return records


def record_to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    """Normalise one record (instruction, prompt/response or chat) to a list of ``{role, content}`` messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _check_messages(obj["messages"], where)
    if "instruction" in obj:
        instruction = _text_field(obj, "instruction", where)
        extra = _text_field(obj, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        answer = _text_field(obj, "output", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if "prompt" in obj:
        answer_key = "response" if "response" in obj else "completion"
        return [
            {"role": "user", "content": _text_field(obj, "prompt", where)},
            {"role": "assistant", "content": _text_field(obj, answer_key, where)},
        ]
    raise DataError(
        f"{where}: unknown record format (keys {sorted(obj)}); use {{\"instruction\", \"input\"?, \"output\"}}, "
        "{\"prompt\", \"response\"|\"completion\"} or {\"messages\": [{\"role\", \"content\"}, ...]}"
    )


def _text_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing the {key!r} field")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in _ROLES:
            raise DataError(f"{where}: messages[{i}] has role {msg['role']!r}; use one of {', '.join(_ROLES)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to train on; add the assistant's reply")
    return out


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` file: blocks separated by blank lines (whitespace-only blocks dropped)."""
    text = Path(path).read_text(encoding="utf-8")
    docs = [block.strip() for block in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path} is empty; a .txt training file needs some text")
    return docs


# --- rendering and tokenizing ----------------------------------------------------------------------------
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """``[(text, trainable)]`` pieces whose concatenation is the rendered conversation.

    With a chat template, assistant text is what rendering ``messages[:i+1]`` adds to rendering
    ``messages[:i]`` with the generation prompt; that needs a template whose renders extend each other.
    Templates that rewrite history (some drop earlier reasoning) fall back to the simple template, with a warning.
    """
    if has_chat_template(tokenizer):
        segments = _template_segments(messages, tokenizer)
        if segments is not None:
            return segments
        warnings.warn(
            "the tokenizer's chat template does not render conversations prefix by prefix; using holdall's "
            "simple template for training (see holdall.training.data.SIMPLE_TEMPLATE)",
            stacklevel=2,
        )
    return _simple_segments(messages, tokenizer)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _template_segments(messages, tokenizer) -> list[tuple[str, bool]] | None:
    segments: list[tuple[str, bool]] = []
    done = ""  # the rendered text already split into segments
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        after = _render(tokenizer, messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            return None
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = _render(tokenizer, messages, False)
    if not full.startswith(done):
        return None
    segments.append((full[len(done):], False))
    return [(text, trainable) for text, trainable in segments if text]


def _simple_segments(messages, tokenizer) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token or ""
    segments = []
    for msg in messages:
        role = msg["role"].capitalize()
        if msg["role"] == "assistant":
            segments.append((SIMPLE_TEMPLATE.format(role=role, content="").rstrip("\n") + "\n", False))
            segments.append((msg["content"] + eos, True))
        else:
            segments.append((SIMPLE_TEMPLATE.format(role=role, content=msg["content"]), False))
    return segments


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(messages: list[dict[str, str]], tokenizer) -> Example:
    """Token ids and labels (``-100`` outside assistant turns) of one conversation."""
    ids: list[int] = []
    labels: list[int] = []
    if not has_chat_template(tokenizer) and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trainable in chat_segments(messages, tokenizer):
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if trainable else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels)


def tokenize_document(text: str, tokenizer) -> Example:
    """A plain-text document: BOS (if any) + tokens + EOS, every token but BOS trained on."""
    ids = _encode(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    if tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)
    return Example(ids, labels)


# --- packing, truncation, split --------------------------------------------------------------------------
def truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.labels[:max_len])


def chunk_document(example: Example, max_len: int) -> list[Example]:
    """Cut a long plain-text example into ``max_len`` windows (text documents are not truncated)."""
    return [
        Example(example.input_ids[i : i + max_len], example.labels[i : i + max_len])
        for i in range(0, len(example), max_len)
    ]


def pack(examples: Sequence[Example], max_len: int, eos_id: int | None) -> list[Example]:
    """Concatenate ``examples`` (each ending with EOS) into ``max_len`` windows; see the module docstring.

    The first token of every example gets label -100: nothing is learnt across example boundaries.
    A trailing window shorter than ``max_len`` is kept (it is padded at batching time).
    """
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ex_ids, ex_labels = list(ex.input_ids), list(ex.labels)
        if eos_id is not None and ex_ids and ex_ids[-1] != eos_id:
            ex_ids.append(eos_id)
            ex_labels.append(IGNORE_INDEX)  # an EOS we added was never part of a response
        if ex_labels:
            ex_labels[0] = IGNORE_INDEX
        ids += ex_ids
        labels += ex_labels
    windows = [Example(ids[i : i + max_len], labels[i : i + max_len]) for i in range(0, len(ids), max_len)]
    return [w for w in windows if w.n_trainable]


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then ``(train, eval)`` with ``round(fraction * n)`` eval items (at least 1 when
    ``fraction > 0`` and there are 2+ items, and never all of them)."""
    if not 0 <= fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if fraction > 0 and len(items) >= 2:
        n_eval = min(len(items) - 1, max(1, round(fraction * len(items))))
    eval_idx = set(order[:n_eval])
    train = [items[i] for i in range(len(items)) if i not in eval_idx]
    evals = [items[i] for i in range(len(items)) if i in eval_idx]
    return train, evals


# --- the whole pipeline ----------------------------------------------------------------------------------
@dataclass
class Datasets:
    """Model-ready sequences: ``train`` and ``eval`` lists of :class:`Example` (each at most ``max_len``)."""

    train: list[Example]
    eval: list[Example]
    n_records: int
    n_dropped: int  # examples left with no trainable token after truncation

    @property
    def train_tokens(self) -> int:
        return sum(len(ex) for ex in self.train)


def load_examples(path: str | Path, tokenizer) -> tuple[list[Example], bool]:
    """Tokenized examples of a data file, and whether they are plain-text documents (``.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist (expected a .jsonl or .txt file)")
    if path.suffix.lower() == ".txt":
        return [tokenize_document(doc, tokenizer) for doc in read_text_documents(path)], True
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl (instruction/chat) or .txt")
    examples = []
    for lineno, messages in read_jsonl(path):
        try:
            examples.append(tokenize_chat(messages, tokenizer))
        except Exception as exc:  # a template error is the data's fault here: say which line
            raise DataError(f"{path}, line {lineno}: could not render/tokenize this record: {exc}") from exc
    return examples, False


def build_datasets(
    path: str | Path,
    tokenizer,
    max_len: int = 512,
    packing: bool = False,
    eval_fraction: float = 0.0,
    seed: int = 0,
) -> Datasets:
    """Read, tokenize, split (by record, before packing, so no record is in both) and pack/truncate."""
    if tokenizer is None:
        raise DataError("fine-tuning needs a tokenizer; the model source ships none, so pass tokenizer=...")
    if max_len < 2:
        raise DataError(f"max_len must be at least 2 tokens, got {max_len}")
    examples, is_text = load_examples(path, tokenizer)
    train, evals = split_eval(examples, eval_fraction, seed)
    n_before = len(train) + len(evals)
    train, evals = (_shape(part, max_len, packing, is_text, tokenizer.eos_token_id) for part in (train, evals))
    dropped = 0
    if not packing and not is_text:
        dropped = n_before - len(train) - len(evals)
    if not train:
        raise DataError(
            f"{path}: no training sequence has a token to learn from (after truncation to max_len={max_len}); "
            "raise max_len or shorten the prompts"
        )
    if dropped:
        warnings.warn(
            f"{dropped} example(s) had no response token left after truncation to {max_len} and were dropped",
            stacklevel=2,
        )
    return Datasets(train, evals, len(examples), dropped)


def _shape(examples: list[Example], max_len: int, packing: bool, is_text: bool, eos_id) -> list[Example]:
    if packing:
        return pack(examples, max_len, eos_id)
    if is_text:
        return [w for ex in examples for w in chunk_document(ex, max_len) if w.n_trainable]
    return [t for t in (truncate(ex, max_len) for ex in examples) if t.n_trainable]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``labels``/``attention_mask`` ``[batch, longest]`` (labels -100 on pads)."""
    longest = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
