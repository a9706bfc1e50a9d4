"""The decoder-only architectures holdall supports, and what it needs to know about each.

Every family listed here loads through transformers' generic ``AutoModelForCausalLM`` path and is covered by a
tiny-config test (``tests/test_models_families.py``). A family records the module names that the quantizers,
the memory planner and the GGUF importer need: which linears make up a decoder block, which modules are norms,
and the quirks that change how weights are stored (fused projections, tied embeddings, norm offsets).

Nothing here imports transformers: ``config`` arguments are duck-typed (anything with ``model_type``), so the
layer is usable for planning from a bare ``config.json`` dict too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from holdall.errors import UnsupportedModelError

# The standard Llama block: the names every family below shares unless it says otherwise.
LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Family:
    """One supported architecture (an HF ``model_type``) and its module layout."""

    model_type: str
    description: str
    # Relative to one decoder block (``model.layers.<i>``); order = order of use in the forward pass.
    attention_linears: tuple[str, ...] = LLAMA_ATTENTION
    mlp_linears: tuple[str, ...] = LLAMA_MLP
    block_norms: tuple[str, ...] = LLAMA_BLOCK_NORMS
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    head_path: str = "lm_head"
    # The value transformers uses when config.json omits tie_word_embeddings.
    ties_embeddings_by_default: bool = False
    # llama.cpp's ``general.architecture`` names that transformers maps onto this model_type.
    gguf_architectures: tuple[str, ...] = ()
    quirks: tuple[str, ...] = field(default_factory=tuple)

    @property
    def decoder_linears(self) -> tuple[str, ...]:
        """The linears of one decoder block, relative to the block."""
        return self.attention_linears + self.mlp_linears

    def layer_linear_names(self, num_layers: int) -> list[str]:
        """Full module names of every decoder linear, e.g. ``model.layers.0.self_attn.q_proj``."""
        return [f"{self.layers_path}.{i}.{name}" for i in range(num_layers) for name in self.decoder_linears]


_FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "Llama 1/2/3, SmolLM/SmolLM2, TinyLlama, Yi, DeepSeek-LLM (dense)",
            gguf_architectures=("llama",),
        ),
        Family(
            "mistral",
            "Mistral 7B and its fine-tunes (sliding-window attention)",
            gguf_architectures=("mistral",),
            quirks=("llama.cpp files usually say 'llama'; transformers re-labels them by the model name",),
        ),
        Family(
            "qwen2",
            "Qwen2 / Qwen2.5 (dense)",
            gguf_architectures=("qwen2",),
            quirks=("q/k/v projections carry a bias",),
        ),
        Family(
            "qwen3",
            "Qwen3 (dense)",
            block_norms=LLAMA_BLOCK_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
            gguf_architectures=("qwen3",),
            quirks=("per-head RMSNorm on queries and keys (q_norm, k_norm)",),
        ),
        Family(
            "phi3",
            "Phi-3 / Phi-3.5 / Phi-4-mini",
            attention_linears=("self_attn.qkv_proj", "self_attn.o_proj"),
            mlp_linears=("mlp.gate_up_proj", "mlp.down_proj"),
            gguf_architectures=("phi3",),
            quirks=("q/k/v fused into qkv_proj and gate/up fused into gate_up_proj",),
        ),
        Family(
            "gemma",
            "Gemma (1st generation)",
            ties_embeddings_by_default=True,
            quirks=(
                "RMSNorm scales by (1 + weight): stored norm weights are offsets from 1",
                "input embeddings are multiplied by sqrt(hidden_size)",
                "lm_head always tied to the embedding",
            ),
        ),
        Family(
            "gemma2",
            "Gemma 2",
            block_norms=LLAMA_BLOCK_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
            ties_embeddings_by_default=True,
            gguf_architectures=("gemma2",),
            quirks=(
                "RMSNorm scales by (1 + weight): stored norm weights are offsets from 1",
                "input embeddings are multiplied by sqrt(hidden_size)",
                "attention and final logits are soft-capped",
                "lm_head always tied to the embedding",
            ),
        ),
    )
}


def supported_model_types() -> list[str]:
    """The HF ``model_type`` values holdall loads, quantizes and saves."""
    return list(_FAMILIES)


def supported_summary() -> str:
    """One line per family, for error messages and ``holdall info``."""
    return "; ".join(f"{f.model_type} ({f.description})" for f in _FAMILIES.values())


def _model_type_of(config: Any) -> str | None:
    if isinstance(config, Mapping):
        return config.get("model_type")
    if isinstance(config, str):
        return config
    return getattr(config, "model_type", None)


def get_family(config_or_model_type: Any) -> Family:
    """The :class:`Family` of a config (object or dict), a model (via ``.config``) or a model_type string."""
    config = getattr(config_or_model_type, "config", config_or_model_type)
    model_type = _model_type_of(config)
    family = _FAMILIES.get(model_type or "")
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by holdall. Supported decoder-only architectures: "
            f"{supported_summary()}. Use a model of one of these families, or open an issue asking for "
            f"{model_type!r}."
        )
    return family


def check_supported(config: Any) -> Family:
    """Raise :class:`UnsupportedModelError` unless ``config`` describes a supported decoder-only LM.

    Besides the model_type, refuse configs that would break the name-based layer selection: mixture-of-expert
    variants that reuse a dense model_type, and encoder-decoder configs.
    """
    family = get_family(config)
    cfg = getattr(config, "config", config)
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    if get("is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"this {family.model_type} config is an encoder-decoder model; holdall supports decoder-only "
            "language models only"
        )
    if get("num_local_experts", None) or get("num_experts", None):
        raise UnsupportedModelError(
            f"this {family.model_type} config describes a mixture-of-experts model, which holdall does not "
            f"handle yet. Supported: {supported_summary()}"
        )
    return family


def num_layers(config: Any) -> int:
    cfg = getattr(config, "config", config)
    value = cfg.get("num_hidden_layers") if isinstance(cfg, Mapping) else getattr(cfg, "num_hidden_layers", None)
    if value is None:
        raise UnsupportedModelError("the model config has no num_hidden_layers; is it a decoder-only LM config?")
    return int(value)


def decoder_linear_names(model_or_config: Any) -> list[str]:
    """Full names of every decoder linear of a model (or of the model a config would build), in forward order.

    These are the default quantization targets; the embedding and lm_head are never among them.
    """
    family = check_supported(model_or_config)
    return family.layer_linear_names(num_layers(model_or_config))


_BLOCK_INDEX = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj`` -> ``(3, "mlp.up_proj")``; ``None`` for names outside the blocks."""
    match = _BLOCK_INDEX.match(name)
    if not match:
        return None
    return int(match["index"]), match["rest"]


def is_tied(config: Any) -> bool:
    """Whether lm_head shares the embedding matrix for this config (the family default when unset)."""
    family = get_family(config)
    cfg = getattr(config, "config", config)
    value = cfg.get("tie_word_embeddings") if isinstance(cfg, Mapping) else getattr(cfg, "tie_word_embeddings", None)
    return family.ties_embeddings_by_default if value is None else bool(value)


def model_type_from_gguf(architecture: str) -> str:
    """Map a GGUF ``general.architecture`` to the HF model_type holdall will load it as."""
    for family in _FAMILIES.values():
        if architecture in family.gguf_architectures:
            return family.model_type
    readable = sorted(a for f in _FAMILIES.values() for a in f.gguf_architectures)
    raise UnsupportedModelError(
        f"GGUF architecture {architecture!r} is not supported by holdall. Supported GGUF architectures: "
        f"{', '.join(readable)}. Convert the original Hugging Face model instead, or open an issue."
    )


def gguf_architectures() -> list[str]:
    return sorted(a for f in _FAMILIES.values() for a in f.gguf_architectures)


def families() -> Iterable[Family]:
    return tuple(_FAMILIES.values())
