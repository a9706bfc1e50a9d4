"""A Hugging Face Llama-family model as llama.cpp sees it: GGUF tensor names, layouts and architecture metadata.

Covers transformers' LlamaForCausalLM (SmolLM/SmolLM2, TinyLlama, Llama 2/3 ...), MistralForCausalLM (written
as llama.cpp's "llama" architecture, as convert_hf_to_gguf.py does) and Qwen2ForCausalLM ("qwen2", with its
q/k/v biases). Nothing is copied or encoded here: :func:`convert_model` returns the tensor list with a
``fetch`` per tensor, so the exporter can encode and write one tensor at a time.

Two layout facts matter for getting the same numbers out of llama.cpp:

* "llama" rotates query/key pairs (2i, 2i+1) of each head, transformers rotates (i, i + head_dim/2); the
  q_proj/k_proj rows (and biases) are therefore permuted per head (:func:`permute_rope_rows`). qwen2 uses the
  NEOX rotation, which is transformers' layout, so nothing is permuted there.
* A tied model has no ``output`` tensor: llama.cpp reuses ``token_embd`` as the head.

The tokenizer half of the conversion lives in :mod:`holdall.formats.gguf.vocab`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...core.linear import QuantLinear
from ...errors import ConfigError, UnsupportedModelError
from ...models.families import check_supported, is_tied
from .filetypes import ModelShape

# HF model_type -> llama.cpp architecture (convert_hf_to_gguf.py registers MistralForCausalLM as LlamaModel).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# Module inside a decoder block -> llama.cpp tensor base name, in the order llama.cpp's forward uses them.
BLOCK_TENSORS = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as llama.cpp stores it; ``kind`` is "linear", "yarn" or "llama3" (a rope_freqs tensor)."""

    kind: str
    factor: float
    original_context: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the remaining HF rope parameters


@dataclass(frozen=True)
class HParams:
    """The architecture metadata of one model, in llama.cpp's terms."""

    arch: str
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tied: bool
    rope_scaling: RopeScaling | None = None
    name: str | None = None

    @property
    def model_shape(self) -> ModelShape:
        return ModelShape(self.arch, self.n_layer, self.n_head, self.n_head_kv)


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor before encoding: its name, numpy-order shape and how to produce its float values."""

    name: str
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Conversion:
    hparams: HParams
    tensors: tuple[SourceTensor, ...]


# ------------------------------------------------------------------------------------------ checks


def gguf_architecture(config) -> str:
    """llama.cpp's architecture name for a transformers config; UnsupportedModelError for anything else."""
    family = check_supported(config)
    arch = GGUF_ARCH.get(family.model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCH))} models; this one is {family.model_type!r}. "
            "Use llama.cpp's convert_hf_to_gguf.py for other architectures."
        )
    return arch


def _is_adapter_wrapper(module: nn.Module) -> bool:
    # LoRA layers (holdall's and PEFT's) keep the frozen base in `base_layer` beside `lora_A` / `lora_B`.
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def check_exportable(model: nn.Module, force: bool = False) -> None:
    """Refuse models whose weights are not plain floats llama.cpp can re-quantize once.

    A holdall-quantized model (QuantLinear layers) is refused unless ``force``: its weights were already
    rounded to holdall's grid, and GGUF re-rounds them to llama.cpp's, so errors add up (double rounding).
    """
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if (quantized or getattr(model, "holdall_quant", None)) and not force:
        example = f" ({len(quantized)} layers, e.g. {quantized[0]})" if quantized else ""
        raise ConfigError(
            f"this model is holdall-quantized{example}. "
            "Exporting them to GGUF would round the weights twice: once to holdall's grid, again to llama.cpp's, "
            "and the errors add up. Reload the float model (the one you quantized, or the merged fine-tune) and "
            "export it once; or pass force=True (CLI: --force) to dequantize these layers and export anyway."
        )
    adapters = [name for name, m in model.named_modules() if _is_adapter_wrapper(m)]
    if adapters:
        raise ConfigError(
            f"this model has unmerged LoRA adapters (e.g. {adapters[0]}). Merge them into the float base first "
            "(holdall merge BASE ADAPTER -o DIR, or holdall.merge) and export the merged model."
        )


# ----------------------------------------------------------------------------------------- hparams


def _rope_parameters(config) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling together in rope_parameters; 4.x had rope_theta + rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def _rope_scaling(config, params: dict[str, Any]) -> RopeScaling | None:
    kind = str(params.get("rope_type") or "default").lower()
    if kind == "default":
        return None
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    if kind in ("linear", "yarn") and factor is not None:
        if kind == "yarn" and original is None:
            raise UnsupportedModelError("YaRN rope scaling without original_max_position_embeddings cannot be exported")
        return RopeScaling(kind, float(factor), original, params)
    if kind == "llama3":
        return RopeScaling(kind, float(factor or 8.0), int(original or 8192), params)
    raise UnsupportedModelError(
        f"rope scaling {kind!r} has no llama.cpp equivalent for this architecture; the GGUF would compute a "
        "different model. Export a checkpoint without it (or with linear / yarn / llama3 scaling)."
    )


def _model_name(model: nn.Module) -> str | None:
    # general.name: the last path / hub-id component of what the model was loaded from, if known.
    source = getattr(model, "holdall_source", None)
    name = getattr(source, "spec", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        return None
    return str(name).rstrip("/").split("/")[-1] or None


def _shares_embedding(model: nn.Module) -> bool:
    """Tied for llama.cpp: the config says so *and* the head really is the embedding matrix.

    A model whose head was untied after loading (fine-tuned separately, say) keeps its own ``output`` tensor.
    """
    if not is_tied(model.config):
        return False
    family = check_supported(model.config)
    head = model.get_submodule(family.head_path)
    embedding = model.get_submodule(family.embed_path).weight
    weight = getattr(head, "weight", None)
    return weight is not None and (weight is embedding or torch.equal(weight, embedding))


def read_hparams(model: nn.Module) -> HParams:
    """The llama.cpp hyper-parameters of ``model`` (a transformers causal LM of a supported family)."""
    config = model.config
    arch = gguf_architecture(config)
    n_head = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    params = _rope_parameters(config)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        warnings.warn(
            f"this model uses sliding-window attention ({config.sliding_window} tokens), which llama.cpp's {arch} "
            "architecture does not; outputs agree only for contexts up to that length",
            stacklevel=3,
        )
    return HParams(
        arch=arch,
        n_vocab=int(model.get_input_embeddings().weight.shape[0]),  # rows, which may exceed the tokenizer's
        n_ctx=int(config.max_position_embeddings),
        n_embd=int(config.hidden_size),
        n_ff=int(config.intermediate_size),
        n_layer=int(config.num_hidden_layers),
        n_head=n_head,
        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        head_dim=int(head_dim),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rms_eps=float(config.rms_norm_eps),
        tied=_shares_embedding(model),
        rope_scaling=_rope_scaling(config, params),
        name=_model_name(model),
    )


def write_hparams(writer, hp: HParams) -> None:
    """Write ``{arch}.*`` keys the way convert_hf_to_gguf.py does (the typed GGUFWriter helpers)."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    if hp.name:
        writer.add_name(hp.name)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    _write_rope_scaling(writer, hp.rope_scaling)


def _write_rope_scaling(writer, rope: RopeScaling | None) -> None:
    import gguf

    if rope is None or rope.kind == "llama3":  # llama3 scaling travels as the rope_freqs tensor instead
        return
    kind = gguf.RopeScalingType.LINEAR if rope.kind == "linear" else gguf.RopeScalingType.YARN
    writer.add_rope_scaling_type(kind)
    writer.add_rope_scaling_factor(rope.factor)
    if rope.kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope.original_context)
        extras = {
            "extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
            "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
            "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
            "beta_slow": writer.add_rope_scaling_yarn_beta_slow,
        }
        for key, add in extras.items():
            if rope.params.get(key) is not None:
                add(float(rope.params[key]))


def llama3_rope_factors(hp: HParams) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's rope scaling, [head_dim / 2] float32 (llama.cpp's rope_freqs).

    Long wavelengths (beyond the original context / low_freq_factor) are slowed by ``factor``, short ones
    (below original context / high_freq_factor) kept, and the band between interpolated smoothly.
    """
    rope = hp.rope_scaling
    low = float(rope.params.get("low_freq_factor", 1.0))
    high = float(rope.params.get("high_freq_factor", 4.0))
    old_ctx = rope.original_context
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float32) / hp.head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_ctx / high:
            factors.append(1.0)
        elif wavelength > old_ctx / low:
            factors.append(rope.factor)
        else:
            smooth = (old_ctx / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / rope.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- tensors


def permute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows per head from transformers' half-split rotary layout to llama.cpp's interleaved one.

    Within each head, row ``i`` of the first half and row ``i`` of the second half form one rotated pair;
    llama.cpp wants them adjacent (rows 2i, 2i+1). Works for weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _check_layer(module: nn.Module, name: str) -> None:
    # Checked while listing tensors, so an unexportable layer fails before the output file is started.
    plain = isinstance(module, (nn.Linear, nn.Embedding, QuantLinear))
    norm = getattr(module, "weight", None) is not None and module.weight.dim() == 1
    if not (plain or norm):
        raise UnsupportedModelError(
            f"cannot export {name} ({type(module).__name__}) to GGUF: holdall exports float (or holdall-quantized) "
            "layers. Load the model without third-party quantization (bitsandbytes, GPTQ ...) first."
        )


def _weight_source(name: str, module: nn.Module, permute_heads: int | None = None) -> SourceTensor:
    _check_layer(module, name)
    if isinstance(module, QuantLinear):  # only reached with force=True: dequantized when fetched
        shape = (module.out_features, module.in_features)
    else:
        shape = tuple(module.weight.shape)

    def fetch() -> torch.Tensor:
        if isinstance(module, QuantLinear):
            weight = module.dequantize_weight(torch.float32)
        else:
            weight = module.weight.detach()
        return permute_rope_rows(weight, permute_heads) if permute_heads else weight

    return SourceTensor(name, shape, fetch)


def _bias_source(name: str, module: nn.Module, permute_heads: int | None = None) -> SourceTensor:
    def fetch() -> torch.Tensor:
        bias = module.bias.detach()
        return permute_rope_rows(bias, permute_heads) if permute_heads else bias

    return SourceTensor(name, tuple(module.bias.shape), fetch)


def _block_sources(block: nn.Module, i: int, hp: HParams) -> list[SourceTensor]:
    permute = {"attn_q": hp.n_head, "attn_k": hp.n_head_kv} if hp.arch == "llama" else {}
    sources = []
    for hf_name, gguf_name in BLOCK_TENSORS:
        module = block.get_submodule(hf_name)
        heads = permute.get(gguf_name)
        sources.append(_weight_source(f"blk.{i}.{gguf_name}.weight", module, heads))
        if getattr(module, "bias", None) is not None:
            sources.append(_bias_source(f"blk.{i}.{gguf_name}.bias", module, heads))
    return sources


def convert_model(model: nn.Module, force: bool = False) -> Conversion:
    """The GGUF tensors and hyper-parameters of ``model``; nothing is copied until a tensor is fetched."""
    hp = read_hparams(model)
    check_exportable(model, force=force)
    family = check_supported(model.config)
    sources = [_weight_source("token_embd.weight", model.get_submodule(family.embed_path))]
    if hp.rope_scaling is not None and hp.rope_scaling.kind == "llama3":
        factors = llama3_rope_factors(hp)
        sources.append(SourceTensor("rope_freqs.weight", tuple(factors.shape), lambda: factors))
    for i, block in enumerate(model.get_submodule(family.layers_path)):
        sources += _block_sources(block, i, hp)
    sources.append(_weight_source("output_norm.weight", model.get_submodule(family.final_norm_path)))
    if not hp.tied:
        sources.append(_weight_source("output.weight", model.get_submodule(family.head_path)))
    return Conversion(hp, tuple(sources))
