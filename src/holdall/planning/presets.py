"""Offline architecture presets: plan memory for well-known models without the Hub.

Values are the published ``config.json`` fields of each model (Hugging Face repositories named in
``source``). ``nominal_params`` is the size in the model's name, used only by the textbook view, which
applies the seed's rules of thumb to that round number. The exact parameter counts the planner derives from
these shapes are checked in the tests against the published totals (e.g. Llama-2-7B 6,738,415,616).
"""

from __future__ import annotations

# name -> config.json fields (HF spelling, so arch_from_config reads presets and real configs alike)
PRESETS: dict[str, dict] = {
    "llama-2-7b": {
        "source": "meta-llama/Llama-2-7b-hf",
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "nominal_params": 7e9,
    },
    "llama-2-13b": {
        "source": "meta-llama/Llama-2-13b-hf",
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "nominal_params": 13e9,
    },
    "llama-2-70b": {
        "source": "meta-llama/Llama-2-70b-hf",
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "nominal_params": 70e9,
    },
    "mistral-7b": {
        "source": "mistralai/Mistral-7B-v0.1",
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "nominal_params": 7e9,
    },
    "llama-3-8b": {
        "source": "meta-llama/Meta-Llama-3-8B",
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "nominal_params": 8e9,
    },
    "llama-3-70b": {
        "source": "meta-llama/Meta-Llama-3-70B",
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "nominal_params": 70e9,
    },
    "qwen2-7b": {
        # Qwen2 has biases on q/k/v (not o); the base model's config says 131072 positions
        # (Qwen2-7B-Instruct's says 32768).
        "source": "Qwen/Qwen2-7B",
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "nominal_params": 7e9,
    },
    "smollm2-135m": {
        "source": "HuggingFaceTB/SmolLM2-135M",
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "nominal_params": 135e6,
    },
    "smollm2-360m": {
        "source": "HuggingFaceTB/SmolLM2-360M",
        "model_type": "llama",
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "nominal_params": 360e6,
    },
    "smollm2-1.7b": {
        "source": "HuggingFaceTB/SmolLM2-1.7B",
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "nominal_params": 1.7e9,
    },
}

# Spellings people type for the same presets.
ALIASES: dict[str, str] = {
    "llama2-7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b",
    "llama2-70b": "llama-2-70b",
    "llama3-8b": "llama-3-8b",
    "llama3-70b": "llama-3-70b",
    "mistral-7b-v0.1": "mistral-7b",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2-360m-instruct": "smollm2-360m",
    "smollm2-1.7b-instruct": "smollm2-1.7b",
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict | None:
    """The preset's config dict (a copy) for a name, alias or source hub id, case-insensitive; else None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        # a hub id we hold a preset for (e.g. meta-llama/Llama-2-7b-hf) plans offline, without the Hub
        key = next((k for k, p in PRESETS.items() if p["source"].lower() == key), key)
    preset = PRESETS.get(key)
    return None if preset is None else {"name": key, **preset}
