"""holdall: pack large language models into smaller suitcases and tailor them to each customer.

The public verbs are imported lazily so that ``import holdall`` stays light (no transformers, no
tokenizers) until a verb is actually used::

    import holdall
    model, tok = holdall.load_model("smollm2")
    holdall.quantize(model, holdall.QuantConfig.for_method("rtn", bits=4, group_size=128))
    holdall.save_quantized(model, tok, "smollm2-int4")
    print(holdall.evaluate(model, tok, holdall.load_text("wiki.test.txt"), seq_len=2048).ppl)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QuantScheme": "holdall.core.scheme",
    "QuantizedTensor": "holdall.core.qtensor",
    "QuantLinear": "holdall.core.linear",
    "QuantConfig": "holdall.algorithms.config",
    "quantize": "holdall.algorithms",
    "load_model": "holdall.models.loading",
    "load_tokenizer": "holdall.models.loading",
    "save_hf": "holdall.models.loading",
    "model_info": "holdall.models.info",
    "save_quantized": "holdall.models.checkpoint",
    "load_quantized": "holdall.models.checkpoint",
    "evaluate": "holdall.evaluation.perplexity",
    "evaluate_many": "holdall.evaluation.perplexity",
    "load_text": "holdall.evaluation.text",
    "plan_memory": "holdall.planning.memory",
    "load_arch": "holdall.planning.memory",
    "LoraConfig": "holdall.tuners.lora",
    "add_lora": "holdall.tuners.lora",
    "save_adapter": "holdall.tuners.lora",
    "load_adapter": "holdall.tuners.lora",
    "merge_lora": "holdall.tuners.lora",
    "FinetuneConfig": "holdall.training.finetune",
    "finetune": "holdall.training.finetune",
    "merge": "holdall.training.finetune",
    "export_gguf": "holdall.formats.gguf.export",
    "export_checkpoint": "holdall.formats",
    "generate": "holdall.serving.generate",
}
# Verbs that load models: resolving them first imports holdall.formats, which registers the GPTQ / AWQ /
# compressed-tensors readers with models.load_model (the model layer cannot import the formats layer above it).
_LOADING_VERBS = {"load_model", "load_tokenizer", "model_info"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'holdall' has no attribute {name!r}")
    if name in _LOADING_VERBS:
        importlib.import_module("holdall.formats")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return __all__
