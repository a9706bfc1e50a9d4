"""compressed-tensors ``pack-quantized``: the layout llm-compressor writes and vLLM serves (int weight-only, "WNA16").

Per quantized linear ``<name>``::

    <name>.weight_packed      int32 [out, ceil(in*bits/32)]   codes, a dense LSB-first stream along the input dim
    <name>.weight_scale       float [out, n_groups]  ([out, 1] per channel), the model's float dtype usually
    <name>.weight_zero_point  int32 [ceil(out*bits/32), n_groups]  asymmetric only: zeros packed along the OUTPUT dim
    <name>.weight_shape       int64 [2] = (out, in)
    <name>.bias               when the layer has one

compressed-tensors thinks in signed codes ``s = q - 2**(bits-1)`` in ``[-2**(bits-1), 2**(bits-1))`` and packs
``s + 2**(bits-1)`` = holdall's unsigned code ``q``, so the stored bits are holdall's codes; its zero points are
signed the same way and dequantization is ``(s - zp) * scale`` = ``(q - zero) * scale``. A symmetric layer
stores no zero point (zero 0 signed = holdall's implicit midpoint). ``config.json`` carries
``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``,
``quantization_status: compressed``, ``config_groups`` with each group's targets and weight arguments,
``ignore``: the linears left in float).

Packing: 2, 4 and 8 bits are whole codes per int32 word, identical in every compressed-tensors release and
what vLLM's WNA16 kernels serve (4 and 8). compressed-tensors >= 0.19 packs 3/5/6-bit codes as a dense stream
across word boundaries, as holdall writes them; older releases wasted the leftover bits of each word, so they
misread such files, and vLLM serves neither: the exporter writes them (transformers + compressed-tensors >= 0.19
load them) but they are for the HF stack, not for serving.

Groups: compressed-tensors needs ``in_features % group_size == 0`` (``_process_group`` raises otherwise, and
llm-compressor refuses such models): a layer with a partial last group (SmolLM2: 576 columns, g128) is refused
with the fix (g64, or holdall's own format).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, UnsupportedModelError
from .common import (
    DEFAULT_MAX_SHARD_BYTES,
    LayerCodes,
    build_model,
    dividing_group_size,
    empty_model,
    float_tensors,
    layer_codes,
    linear_names,
    load_tensors,
    pack_int32,
    packed_words,
    quantized_layers,
    read_config_json,
    refuse_unsupported_scheme,
    scheme_for,
    take,
    unpack_int32,
    write_checkpoint,
)

FORMAT = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
#: The compressed-tensors release whose layout holdall writes (dense int32 packing of 3/5/6-bit codes).
LAYOUT_VERSION = "0.19.0"
BITS = (2, 3, 4, 5, 6, 8)


def export_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a holdall-quantized model as a compressed-tensors ``pack-quantized`` checkpoint; return the directory.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it (with the ``compressed-tensors``
    package installed) and vLLM serves it (4/8 bits). Linears holdall left in float are listed in ``ignore``.
    Codes and scales are written as they are (no re-rounding); ``out_dir`` appears complete or not at all.
    """
    layers = quantized_layers(model, FORMAT)
    for name, layer in layers.items():
        check_exportable(model, [name], layer.scheme)
    tensors = float_tensors(model, layers)
    for name, layer in layers.items():
        tensors.update(_layer_tensors(name, layer_codes(layer)))
    config = _quantization_config(model, layers)
    return write_checkpoint(out_dir, model, tensors, config, tokenizer, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes)


def check_exportable(model: nn.Module, names: list[str], scheme) -> None:
    """Refuse, before any work, linears ``names`` of ``model`` quantized with ``scheme`` that this format can't hold."""
    for name in names:
        refuse_unsupported_scheme(name, scheme, FORMAT, bits=BITS)
        _check_groups(name, model.get_submodule(name).in_features, scheme)


def _check_groups(name: str, in_features: int, scheme) -> None:
    if scheme.granularity == "group" and in_features % scheme.group_size:
        raise ConfigError(
            f"{name} has {in_features} input columns, not a multiple of group_size {scheme.group_size}: its last "
            f"group is partial, which compressed-tensors cannot represent (it reshapes each row into whole groups). "
            f"Re-quantize with a group size that divides {in_features} (e.g. --group-size "
            f"{dividing_group_size(in_features, scheme.group_size)}), or keep the model in holdall's own format"
        )


def _layer_tensors(name: str, layer: LayerCodes) -> dict[str, torch.Tensor]:
    scheme = layer.scheme
    tensors = {
        f"{name}.weight_packed": pack_int32(layer.codes, scheme.bits),
        f"{name}.weight_scale": layer.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not scheme.symmetric:  # zeros [out, G] packed along the output dim: [ceil(out*bits/32), G]
        tensors[f"{name}.weight_zero_point"] = pack_int32(layer.zero.T, scheme.bits).T.contiguous()
    return tensors


def _weight_args(scheme) -> dict[str, Any]:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": scheme.granularity,
        "group_size": scheme.group_size if scheme.granularity == "group" else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _quantization_config(model: nn.Module, layers: dict) -> dict[str, Any]:
    by_scheme: dict[Any, list[str]] = {}
    for name, layer in layers.items():
        by_scheme.setdefault(layer.scheme, []).append(name)
    ignore = [name for name in linear_names(model) if name not in layers]
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        # One scheme: target every Linear and list the float ones in `ignore` (llm-compressor's own shape);
        # several: each group names its layers exactly.
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _weight_args(scheme),
            "input_activations": None,
            "output_activations": None,
            "format": PACK_QUANTIZED,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def load_compressed_tensors(
    directory: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A compressed-tensors ``pack-quantized`` int weight-only checkpoint -> a holdall model with ``QuantLinear``s.

    Codes, scales and zero points are taken bit for bit (the dequantized weights equal what compressed-tensors
    computes); ``dtype`` applies to the float tensors. Other compressed-tensors formats (fp8, nvfp4, sparse,
    activation quantization, act-order with a ``g_idx``) are refused with the reason.
    """
    directory = Path(directory)
    qc = read_config_json(directory)["quantization_config"]
    if qc.get("quant_method") != QUANT_METHOD:
        raise CorruptFileError(
            f"{directory}/config.json: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}"
        )
    _refuse_unsupported_config(qc, directory)
    model = empty_model(directory)
    groups = _parse_groups(qc, directory)
    ignore = list(qc.get("ignore") or [])
    tensors = load_tensors(directory)
    layers: dict[str, LayerCodes] = {}
    for name in linear_names(model):
        if _matches(name, ignore):
            continue
        args = next((group for targets, group in groups if _matches(name, targets)), None)
        if args is None:
            continue
        if f"{name}.weight_packed" not in tensors:
            raise CorruptFileError(
                f"{directory}: {name} is targeted by the quantization_config but has no weight_packed tensor; the "
                "checkpoint is incomplete (or not compressed: quantization_status must be 'compressed')"
            )
        layers[name] = _read_layer(name, args, tensors, directory)
    if not layers:
        raise UnsupportedModelError(f"{directory}: the quantization_config targets no linear layer of this model")
    return build_model(directory, model, layers, tensors, dtype=dtype, device=device, format_name=FORMAT,
                       quantization_config=qc)


def _refuse_unsupported_config(qc: dict, directory: Path) -> None:
    fmt = qc.get("format")
    if qc.get("quantization_status") not in (None, "compressed"):
        raise UnsupportedModelError(
            f"{directory}: quantization_status is {qc.get('quantization_status')!r}; holdall reads compressed "
            "checkpoints (save with llm-compressor's save_compressed=True)"
        )
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(key):
            raise UnsupportedModelError(
                f"{directory}: the checkpoint has a {key}; holdall reads weight-only int quantization without "
                "sparsity, transforms or a quantized KV cache. Load it with transformers/vLLM instead"
            )
    if fmt not in (PACK_QUANTIZED, "mixed-precision", None):
        raise UnsupportedModelError(
            f"{directory}: compressed-tensors format {fmt!r} is not one holdall reads; holdall reads "
            f"{PACK_QUANTIZED!r} (int2..8 weight-only, what llm-compressor writes for W4A16/W8A16)"
        )


def _parse_groups(qc: dict, directory: Path) -> list[tuple[list[str], dict]]:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CorruptFileError(f"{directory}: quantization_config has no config_groups")
    parsed = []
    for group_name, group in groups.items():
        where = f"{directory}: config group {group_name!r}"
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise UnsupportedModelError(f"{where} quantizes no weights; holdall reads weight-only int checkpoints")
        if group.get("input_activations") or group.get("output_activations"):
            raise UnsupportedModelError(
                f"{where} also quantizes activations (W8A8 and the like); holdall stores weight-only quantization. "
                "Serve it with vLLM, or quantize the float model with holdall"
            )
        fmt = group.get("format") or qc.get("format")
        if fmt != PACK_QUANTIZED:
            raise UnsupportedModelError(f"{where} has format {fmt!r}; holdall reads {PACK_QUANTIZED!r} only")
        args = group["weights"]
        if args.get("type", "int") != "int" or args.get("dynamic"):
            raise UnsupportedModelError(
                f"{where}: weights of type {args.get('type')!r} (dynamic={args.get('dynamic')}) are not static int "
                "codes; holdall reads int weight-only checkpoints"
            )
        if args.get("strategy") not in ("group", "channel"):
            raise UnsupportedModelError(
                f"{where}: strategy {args.get('strategy')!r}; holdall reads per-group and per-channel scales"
            )
        if args.get("num_bits") not in BITS:
            raise UnsupportedModelError(f"{where}: {args.get('num_bits')}-bit codes; holdall holds {BITS} bits")
        targets = group.get("targets") or []
        parsed.append((list(targets) if isinstance(targets, list) else [targets], args))
    return parsed


def _matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' matching for our modules: a module name, ``re:<regex>`` or the class name ``Linear``."""
    for target in targets:
        if target == "Linear" or target == name:
            return True
        if target.startswith("re:") and re.match(target[3:], name):
            return True
    return False


def _read_layer(name: str, args: dict, tensors: dict[str, torch.Tensor], directory: Path) -> LayerCodes:
    bits = int(args["num_bits"])
    symmetric = bool(args.get("symmetric", True))
    packed = take(tensors, f"{name}.weight_packed", directory, FORMAT)
    scale = take(tensors, f"{name}.weight_scale", directory, FORMAT)
    shape = take(tensors, f"{name}.weight_shape", directory, FORMAT)
    zero_point = tensors.pop(f"{name}.weight_zero_point", None)
    if f"{name}.weight_g_idx" in tensors:
        g_idx = tensors.pop(f"{name}.weight_g_idx")
        _check_trivial_g_idx(name, g_idx, args, directory)
    out_features, in_features = (int(v) for v in shape.tolist())
    where = f"{directory}: {name}"
    if tuple(packed.shape) != (out_features, packed_words(in_features, bits)):
        raise CorruptFileError(
            f"{where}.weight_packed is {list(packed.shape)}, expected [{out_features}, "
            f"{packed_words(in_features, bits)}] for a [{out_features}, {in_features}] {bits}-bit weight"
        )
    group_size = None if args["strategy"] == "channel" else int(args["group_size"])
    n_groups = 1 if group_size is None else -(-in_features // group_size)
    if group_size is not None and in_features % group_size:
        raise CorruptFileError(f"{where}: {in_features} columns are not whole groups of {group_size}")
    if tuple(scale.shape) != (out_features, n_groups):
        raise CorruptFileError(f"{where}.weight_scale is {list(scale.shape)}, expected [{out_features}, {n_groups}]")
    codes = unpack_int32(packed, bits, in_features)
    mid = 2 ** (bits - 1)
    if symmetric:
        if zero_point is not None and bool((zero_point != 0).any()):
            raise CorruptFileError(f"{where}: a symmetric layer with non-zero weight_zero_point values")
        zero = torch.full((out_features, n_groups), mid, dtype=torch.uint8)
    else:
        if zero_point is None:
            raise CorruptFileError(f"{where}: an asymmetric layer without weight_zero_point")
        if zero_point.dtype != torch.int32 or tuple(zero_point.shape) != (packed_words(out_features, bits), n_groups):
            raise CorruptFileError(
                f"{where}.weight_zero_point is {zero_point.dtype} {list(zero_point.shape)}, expected int32 "
                f"[{packed_words(out_features, bits)}, {n_groups}] (packed along the output dim)"
            )
        zero = unpack_int32(zero_point.T.contiguous(), bits, out_features).T.contiguous()
    scheme = scheme_for(bits, group_size, symmetric, scale.dtype, where)
    return LayerCodes(scheme, codes, scale.contiguous(), zero)


def _check_trivial_g_idx(name: str, g_idx: torch.Tensor, args: dict, directory: Path) -> None:
    """act-order "group" stores a g_idx; holdall's groups are contiguous column ranges, so only the identity fits."""
    size = args.get("group_size")
    expected = torch.arange(g_idx.numel()) // int(size) if size else torch.zeros(g_idx.numel(), dtype=torch.long)
    if not torch.equal(g_idx.long().cpu(), expected):
        raise UnsupportedModelError(
            f"{directory}: {name} was quantized with act-order 'group' (a permuted g_idx): its groups are not "
            "contiguous column ranges, which holdall's layout requires. Re-quantize with actorder='static' "
            "(llm-compressor's default), or load it with transformers/vLLM"
        )
