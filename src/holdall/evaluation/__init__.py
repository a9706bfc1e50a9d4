"""Evaluation: perplexity with the GPTQ/AWQ protocol and KL divergence against a base model."""

from holdall.evaluation.perplexity import (
    EvalResult,
    evaluate,
    evaluate_many,
    format_result,
    format_results,
    make_windows,
)
from holdall.evaluation.text import load_text, tokenize_text

__all__ = [
    "EvalResult",
    "evaluate",
    "evaluate_many",
    "format_result",
    "format_results",
    "load_text",
    "make_windows",
    "tokenize_text",
]
