"""The model-family layer: resolve, load and save models; supported architectures; model_info.

Importing this package does not import transformers; the functions that need it import it when called.
"""

from holdall.models.families import (
    Family,
    check_supported,
    decoder_linear_names,
    get_family,
    model_type_from_gguf,
    supported_model_types,
)
from holdall.models.info import format_info, model_info
from holdall.models.loading import (
    ALIASES,
    ModelSource,
    cache_root,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
    save_hf,
)

__all__ = [
    "ALIASES",
    "Family",
    "ModelSource",
    "cache_root",
    "check_supported",
    "decoder_linear_names",
    "format_info",
    "get_family",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_info",
    "model_type_from_gguf",
    "resolve_model",
    "save_hf",
    "supported_model_types",
]
