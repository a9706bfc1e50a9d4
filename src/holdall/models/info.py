"""``model_info``: what a model is, how many parameters it has and what it costs in memory and on disk.

Counts are *logical*: a quantized linear still has ``in_features * out_features`` weights, but its memory is
the bytes of its packed buffers. So a 4-bit SmolLM2 reports the same ~134.5M parameters and a smaller footprint.
For a model given by name, float sources are measured on the meta device (no weights are read), so asking
about a large checkpoint is instant.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holdall.models.families import check_supported
from holdall.models.files import check_safetensors_dir
from holdall.models.loading import (
    ECOSYSTEM_QUANT_METHODS,
    ModelSource,
    load_config,
    load_model,
    quant_method_of,
    resolve_model,
)

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def _is_quantized_linear(module: nn.Module) -> bool:
    # Duck-typed on the QuantLinear contract, so this layer needs no import of core/ to recognise it.
    return hasattr(module, "quantized_weight") and hasattr(module, "in_features") and hasattr(module, "out_features")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _packed_bytes(module: nn.Module) -> int:
    """Bytes of a quantized linear's weight storage (packed codes, scales, zeros), bias excluded."""
    return sum(_tensor_bytes(b) for name, b in module.named_buffers(recurse=False) if name != "bias")


def _count_parameters(model: nn.Module) -> dict[str, int]:
    """Logical parameter counts: total, input embedding, untied lm_head, and the rest."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if _is_quantized_linear(module):
            total += module.in_features * module.out_features
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # tied parameters appear under two modules
                seen.add(id(p))
                total += p.numel()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = embed.weight.numel() if embed is not None else 0
    tied = embed is not None and head is not None and getattr(head, "weight", None) is embed.weight
    if head is None or tied:
        lm_head = 0
    elif _is_quantized_linear(head):
        lm_head = head.in_features * head.out_features
    else:
        lm_head = head.weight.numel()
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "decoder": total - embedding - lm_head,
        "tied_embeddings": bool(tied),
    }


def _memory(model: nn.Module) -> dict[str, Any]:
    """Bytes of every distinct parameter and buffer (packed buffers for quantized layers), and float dtypes."""
    seen: set[int] = set()
    total = 0
    by_dtype: dict[str, int] = defaultdict(int)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += _tensor_bytes(tensor)
    return {"memory_bytes": total, "bytes_by_dtype": dict(by_dtype)}


def _quantization(model: nn.Module) -> dict[str, Any] | None:
    record = getattr(model, "holdall_quant", None)
    if not record:
        return None
    modules = dict(model.named_modules())
    groups: dict[str, dict[str, Any]] = {}
    for name, scheme in record.get("layers", {}).items():
        key = json.dumps(scheme, sort_keys=True)
        group = groups.setdefault(key, {"scheme": scheme, "layers": 0, "weights": 0, "packed_bytes": 0})
        group["layers"] += 1
        module = modules.get(name)
        if module is not None and _is_quantized_linear(module):
            group["weights"] += module.in_features * module.out_features
            group["packed_bytes"] += _packed_bytes(module)
    schemes = []
    for group in groups.values():
        group["bits_per_weight"] = 8 * group["packed_bytes"] / group["weights"] if group["weights"] else None
        schemes.append(group)
    weights = sum(g["weights"] for g in schemes)
    packed = sum(g["packed_bytes"] for g in schemes)
    config = record.get("config") or {}
    return {
        "method": config.get("method"),
        "config": config,
        "layers": sum(g["layers"] for g in schemes),
        "weights": weights,
        "packed_bytes": packed,
        "bits_per_weight": 8 * packed / weights if weights else None,
        "schemes": schemes,
    }


def _disk(source: ModelSource | None) -> dict[str, Any]:
    if source is None or source.kind == "hub":
        return {"disk_bytes": None, "weights_disk_bytes": None}
    files = source.files()
    return {
        "disk_bytes": sum(f.stat().st_size for f in files),
        "weights_disk_bytes": sum(f.stat().st_size for f in files if f.suffix in _WEIGHT_SUFFIXES),
    }


def _describe(model: nn.Module, source: ModelSource | None) -> dict[str, Any]:
    config = model.config
    info: dict[str, Any] = {
        "source": None if source is None else {"kind": source.kind, "location": source.location,
                                               "spec": source.spec, "alias": source.alias},
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "parameters": _count_parameters(model),
    }
    info.update(_memory(model))
    info.update(_disk(source))
    info["quantization"] = _quantization(model)
    return info


def _meta_model(config, dtype: torch.dtype):
    """Build the architecture on the meta device: every shape, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def model_info(spec_or_model: Any, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Describe a model (an ``nn.Module``) or anything :func:`load_model` accepts.

    Returns a JSON-ready dict: ``model_type``, ``architecture``, ``num_layers``, ``hidden_size``,
    ``vocab_size``, ``parameters`` (``total``, ``embedding``, ``lm_head`` (0 when tied), ``decoder``,
    ``tied_embeddings``), ``memory_bytes`` and ``bytes_by_dtype`` (in memory; for a name, at ``dtype``, the
    dtype load_model would use), ``disk_bytes`` / ``weights_disk_bytes`` (None for hub ids and models built in
    memory) and ``quantization`` (None, or method, layer count, packed bytes, bits/weight and one entry per
    scheme).
    """
    if isinstance(spec_or_model, nn.Module):
        return _describe(spec_or_model, getattr(spec_or_model, "holdall_source", None))
    if not isinstance(spec_or_model, (str, os.PathLike, ModelSource)):
        raise TypeError(f"model_info takes a model or a model name/path, not {type(spec_or_model).__name__}")
    source = resolve_model(spec_or_model)
    ecosystem = source.kind == "hf_dir" and quant_method_of(Path(source.location)) in ECOSYSTEM_QUANT_METHODS
    if source.kind == "holdall" or ecosystem:  # packed weights are small; load them to measure the real buffers
        model, _ = load_model(source)
        return _describe(model, source)
    if source.kind == "hf_dir":  # the weights are not read, but a broken file must not pass as a model
        check_safetensors_dir(source.location)
    config = load_config(source)  # for a .gguf (not yet cached) this validates the file
    check_supported(config)
    return _describe(_meta_model(config, dtype), source)


# ---------------------------------------------------------------------------------------------------------


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _scheme_label(scheme: dict) -> str:
    from holdall.errors import HoldallError

    try:
        from holdall.core.scheme import QuantScheme

        return QuantScheme.from_dict(scheme).label  # e.g. int4-g128-sym
    except (HoldallError, TypeError, ValueError, KeyError):  # unknown/newer scheme dict: show it raw
        return ", ".join(f"{k}={v}" for k, v in sorted(scheme.items()))


def format_info(info: dict[str, Any]) -> str:
    """Render :func:`model_info`'s dict as aligned human-readable lines."""
    params = info["parameters"]
    lines = []
    source = info.get("source")
    if source:
        lines.append(("model", f"{source['spec']} ({source['kind']}: {source['location']})"))
    lines.append((
        "architecture",
        f"{info['architecture']} ({info['model_type']}), {info['num_layers']} layers, "
        f"hidden {info['hidden_size']}, vocab {info['vocab_size']}",
    ))
    head = "tied with the embedding" if params["tied_embeddings"] else f"lm_head {_human_count(params['lm_head'])}"
    lines.append((
        "parameters",
        f"{_human_count(params['total'])} ({params['total']:,}): embedding {_human_count(params['embedding'])}, "
        f"{head}, decoder {_human_count(params['decoder'])}",
    ))
    dtypes = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(info["bytes_by_dtype"].items()))
    lines.append(("memory", f"{human_bytes(info['memory_bytes'])} ({dtypes})"))
    if info.get("disk_bytes") is not None:
        weights = human_bytes(info["weights_disk_bytes"])
        lines.append(("on disk", f"{human_bytes(info['disk_bytes'])} (weights {weights})"))
    quant = info.get("quantization")
    if not quant:
        lines.append(("quantization", "none"))
    else:
        bpw = quant["bits_per_weight"]
        lines.append((
            "quantization",
            f"{quant['method']}: {quant['layers']} layers, {_human_count(quant['weights'])} weights in "
            f"{human_bytes(quant['packed_bytes'])}" + (f", {bpw:.3f} bits/weight" if bpw else ""),
        ))
        for scheme in quant["schemes"]:
            label = _scheme_label(scheme["scheme"])
            sb = scheme["bits_per_weight"]
            lines.append(("", f"{scheme['layers']} layers [{label}]" + (f": {sb:.3f} bits/weight" if sb else "")))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
