"""Fine-tuning data: formats, response-only loss masks, packing boundaries, eval split, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_tokenizer
from holdall.errors import DataError
from holdall.training.data import (
    IGNORE_INDEX,
    Example,
    build_datasets,
    collate,
    pack,
    split_eval,
    tokenize_chat,
)


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _decode_trained(tok, ex: Example) -> str:
    return tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])


def test_instruction_record_trains_only_on_the_output(tmp_path):
    tok = make_tiny_tokenizer()
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "the quick brown fox", "input": "jumps", "output": "over a lazy dog"}])
    data = build_datasets(path, tok, max_len=64)
    (ex,) = data.train
    assert ex.input_ids[0] == tok.bos_token_id
    assert _decode_trained(tok, ex) == "over a lazy dog </s>"
    trained = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    assert trained == list(range(trained[0], len(ex)))  # one contiguous span at the end
    assert ex.labels[trained[0]:] == ex.input_ids[trained[0]:]  # labels are the tokens themselves (HF shifts)


@pytest.mark.parametrize("key", ["response", "completion"])
def test_prompt_response_records(tmp_path, key):
    tok = make_tiny_tokenizer()
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the quick fox", key: "jumps"}])
    (ex,) = build_datasets(path, tok, max_len=64).train
    assert _decode_trained(tok, ex) == "jumps </s>"


def test_chat_without_template_trains_only_assistant_turns():
    tok = make_tiny_tokenizer()
    messages = [
        {"role": "system", "content": "adapters tailor behaviour"},
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "a lazy dog"},
        {"role": "assistant", "content": "while three customers"},
    ]
    ex = tokenize_chat(messages, tok)
    assert _decode_trained(tok, ex) == "jumps over </s> while three customers </s>"


def test_chat_with_template_masks_by_rendered_turns():
    tok = make_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    messages = [
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "a lazy dog"},
        {"role": "assistant", "content": "while three"},
    ]
    ex = tokenize_chat(messages, tok)
    assert tok.decode(ex.input_ids).count("<s>") == 4  # rendered by the template (no extra BOS)
    assert _decode_trained(tok, ex) == "jumps over </s> while three </s>"


def test_plain_text_documents_train_on_every_token(tmp_path):
    tok = make_tiny_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox\n\njumps over a lazy dog\n")
    data = build_datasets(path, tok, max_len=64)
    assert len(data.train) == 2
    for ex in data.train:
        assert ex.labels[0] == IGNORE_INDEX and ex.input_ids[0] == tok.bos_token_id
        assert ex.labels[1:] == ex.input_ids[1:] and ex.input_ids[-1] == tok.eos_token_id


def test_packing_concatenates_with_eos_and_masks_each_examples_first_token():
    eos = 2
    a = Example([1, 10, 11, 12, 2], [-100, -100, 11, 12, 2])
    b = Example([1, 20, 21], [-100, 20, 21])  # does not end with EOS: packing adds one (untrained)
    c = Example([1, 30, 31, 2], [-100, 30, 31, 2])
    windows = pack([a, b, c], max_len=6, eos_id=eos)
    stream = [t for w in windows for t in w.input_ids]
    labels = [t for w in windows for t in w.labels]
    assert stream == [1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31, 2]
    assert labels == [-100, -100, 11, 12, 2, -100, 20, 21, -100, -100, 30, 31, 2]
    assert [len(w) for w in windows] == [6, 6, 1]
    # every packed label is either -100 or the token at its own position
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(labels, stream))


def test_packing_in_build_datasets_fills_windows(tmp_path):
    tok = make_tiny_tokenizer()
    records = [{"prompt": "the quick", "response": "brown fox jumps"} for _ in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    packed = build_datasets(path, tok, max_len=16, packing=True)
    plain = build_datasets(path, tok, max_len=16, packing=False)
    assert all(len(w) == 16 for w in packed.train[:-1])
    assert sum(len(w) for w in packed.train) == sum(len(e) for e in plain.train)
    assert sum(w.n_trainable for w in packed.train) == sum(e.n_trainable for e in plain.train)


def test_truncation_drops_examples_without_a_response_token(tmp_path):
    tok = make_tiny_tokenizer()
    records = [{"prompt": " ".join(["the"] * 30), "response": "fox"}, {"prompt": "the", "response": "quick fox"}]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.warns(UserWarning, match="1 example"):
        data = build_datasets(path, tok, max_len=12)
    assert len(data.train) == 1 and data.n_dropped == 1
    assert all(len(ex) <= 12 for ex in data.train)


def test_eval_split_is_seeded_and_disjoint():
    items = list(range(50))
    train, evals = split_eval(items, 0.2, seed=3)
    assert len(evals) == 10 and sorted(train + evals) == items
    assert split_eval(items, 0.2, seed=3) == (train, evals)
    assert split_eval(items, 0.2, seed=4)[1] != evals
    assert split_eval([1, 2], 0.01, seed=0)[1] != []  # at least one eval item
    assert split_eval([1], 0.5, seed=0) == ([1], [])  # never everything


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2.*not valid JSON"),
        ('["a list"]', "line 2.*JSON object"),
        ('{"instruction": "x"}', "line 2.*missing the 'output'"),
        ('{"instruction": 3, "output": "y"}', "line 2.*'instruction' must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2.*no assistant"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2.*role 'robot'"),
        ('{"text": "hi"}', "line 2.*unknown record format"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, message):
    tok = make_tiny_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "the", "response": "fox"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        build_datasets(path, tok)


def test_missing_and_empty_files(tmp_path):
    tok = make_tiny_tokenizer()
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(tmp_path / "nope.jsonl", tok)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        build_datasets(tmp_path / "e.jsonl", tok)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type"):
        build_datasets(tmp_path / "d.csv", tok)


def test_collate_pads_right_and_masks_pads():
    batch = collate([Example([1, 5, 6], [-100, 5, 6]), Example([1, 7], [-100, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
