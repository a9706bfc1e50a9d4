"""AWQ's GEMM layout (AutoAWQ ``version: gemm``): what AutoAWQ writes and transformers/vLLM load. 4-bit only.

Per quantized linear ``<name>`` (``W [out, in]``, groups of ``group_size`` along the input dim)::

    <name>.qweight  int32 [in, out/8]        row i holds W[:, i]'s codes, eight output channels per word
    <name>.qzeros   int32 [in/group_size, out/8]   zero points, packed like qweight (stored as they are)
    <name>.scales   float16 [in/group_size, out]
    <name>.bias     when the layer has one

Inside a word the eight 4-bit fields, from the least significant nibble up, hold output channels
``[0, 2, 4, 6, 1, 3, 5, 7]`` of its block of eight (AutoAWQ's ``order_map``, matched to its GEMM kernel's
dequantization). ``W[j, i] = scales[g, j] * (q[j, i] - zeros[g, j])`` with ``g = i // group_size``.
``config.json``'s ``quantization_config``: ``quant_method: awq``, ``version: gemm``, ``zero_point: true``,
``bits`` / ``group_size`` (transformers' and vLLM's names) and ``w_bit`` / ``q_group_size`` (AutoAWQ's).

A symmetric holdall layer is written with its implicit zero ``8`` stored (AutoAWQ's GEMM layout always has
``qzeros``), so ``zero_point`` is always true. Refused: other widths, codebooks, channel scales,
non-float16 scales, partial last groups (``in % group_size``: AutoAWQ asserts it, vLLM needs it), ``out % 8``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, UnsupportedModelError
from .common import (
    DEFAULT_MAX_SHARD_BYTES,
    LayerCodes,
    build_model,
    detect_symmetric,
    dividing_group_size,
    empty_model,
    float_tensors,
    layer_codes,
    linear_names,
    load_tensors,
    pack_int32,
    quantized_layers,
    read_config_json,
    refuse_unsupported_scheme,
    require_decoder_linears,
    scheme_for,
    take,
    uniform_scheme,
    unpack_int32,
    write_checkpoint,
)

FORMAT = "awq"
BITS = 4
#: nibble k of a word (from the least significant up) holds output channel ORDER[k] of its block of 8.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: channel c of a block sits in nibble INVERSE[c].
INVERSE = tuple(ORDER.index(c) for c in range(8))


def export_awq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a holdall-quantized model as an AutoAWQ GEMM checkpoint; return the directory.

    Every decoder linear must be quantized with one 4-bit int group scheme with float16 scales (any method: AWQ,
    GPTQ, RTN, HQQ codes all fit the layout). Codes and scales are written as they are, never re-rounded.
    """
    layers = quantized_layers(model, FORMAT)
    scheme = uniform_scheme(model, layers, "AWQ")
    check_exportable(model, list(layers), scheme)
    tensors = float_tensors(model, layers)
    for name, layer in layers.items():
        tensors.update(_layer_tensors(name, layer_codes(layer)))
    config = _quantization_config(scheme)
    return write_checkpoint(out_dir, model, tensors, config, tokenizer, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes)


def check_exportable(model: nn.Module, names: list[str], scheme) -> None:
    """Refuse, before any work, quantizing linears ``names`` of ``model`` with ``scheme`` for an AWQ GEMM export."""
    require_decoder_linears(model, names, "AWQ")
    refuse_unsupported_scheme(names[0], scheme, "AWQ (GEMM)", bits=(BITS,), granularities=("group",),
                              scale_dtypes=("float16",))
    for name in names:
        linear = model.get_submodule(name)
        if linear.in_features % scheme.group_size or linear.out_features % 8:
            raise ConfigError(
                f"{name} is [{linear.out_features}, {linear.in_features}]: AWQ's GEMM layout needs in_features to be "
                f"whole groups of {scheme.group_size} and out_features a multiple of 8. Re-quantize with a group size "
                f"dividing {linear.in_features} (e.g. --group-size "
                f"{dividing_group_size(linear.in_features, scheme.group_size)}), or keep the model in holdall's own "
                "format"
            )


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """``[rows, out]`` in channel order -> the same values in AWQ's nibble order within each block of 8.

    ORDER = (0, 2, 4, 6, 1, 3, 5, 7) is a block of 8 seen as 4 pairs, transposed: evens first, then odds.
    """
    rows, out = values.shape
    return values.reshape(rows, out // 8, 4, 2).transpose(-1, -2).reshape(rows, out).contiguous()


def _deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_interleave` (INVERSE = (0, 4, 1, 5, 2, 6, 3, 7))."""
    rows, out = values.shape
    return values.reshape(rows, out // 8, 2, 4).transpose(-1, -2).reshape(rows, out).contiguous()


def _pack(values: torch.Tensor) -> torch.Tensor:
    """4-bit values ``[rows, out]`` in channel order -> int32 ``[rows, out/8]`` in AWQ's nibble order."""
    if sys.byteorder != "little":
        return pack_int32(_interleave(values), BITS)
    rows, out = values.shape
    v = values.to(torch.uint8).reshape(rows, out // 8, 8)
    # the word's little-endian bytes, low nibble first: (ch0, ch2), (ch4, ch6), (ch1, ch3), (ch5, ch7)
    data = torch.stack([v[..., 0] | (v[..., 2] << 4), v[..., 4] | (v[..., 6] << 4),
                        v[..., 1] | (v[..., 3] << 4), v[..., 5] | (v[..., 7] << 4)], dim=-1)
    return data.reshape(rows, out // 2).view(torch.int32)


def _unpack(words: torch.Tensor, out: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: int32 ``[rows, out/8]`` -> uint8 ``[rows, out]`` in channel order."""
    if sys.byteorder != "little":
        return _deinterleave(unpack_int32(words, BITS, out))
    rows = words.shape[0]
    data = words.contiguous().view(torch.uint8).reshape(rows, out // 8, 4)
    lo, hi = data & 0xF, data >> 4
    channels = [lo[..., 0], lo[..., 2], hi[..., 0], hi[..., 2], lo[..., 1], lo[..., 3], hi[..., 1], hi[..., 3]]
    return torch.stack(channels, dim=-1).reshape(rows, out)


def _layer_tensors(name: str, layer: LayerCodes) -> dict[str, torch.Tensor]:
    return {
        f"{name}.qweight": _pack(layer.codes.T),  # [in, out/8]
        f"{name}.qzeros": _pack(layer.zero.T),  # [G, out/8]
        f"{name}.scales": layer.scale.T.contiguous(),  # [G, out]
    }


def _quantization_config(scheme) -> dict[str, Any]:
    return {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": BITS,
        "group_size": scheme.group_size,
        "w_bit": BITS,
        "q_group_size": scheme.group_size,
        "modules_to_not_convert": None,
    }


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def load_awq(
    directory: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """An AutoAWQ GEMM checkpoint -> a holdall model whose quantized linears are ``QuantLinear``s (same codes)."""
    directory = Path(directory)
    qc = read_config_json(directory)["quantization_config"]
    if qc.get("quant_method") != "awq":
        raise CorruptFileError(f"{directory}/config.json: quant_method is {qc.get('quant_method')!r}, not 'awq'")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedModelError(
            f"{directory}: AWQ version {version!r}; holdall reads the GEMM layout (gemv/marlin/exllama variants "
            "pack differently). Load it with AutoAWQ, or convert it to GEMM"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != BITS:
        raise UnsupportedModelError(f"{directory}: AWQ with {bits}-bit codes; the GEMM layout is 4-bit")
    if qc.get("zero_point") is False:
        raise UnsupportedModelError(
            f"{directory}: AWQ with zero_point=false has no GEMM layout holdall knows; load it with AutoAWQ"
        )
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    model = empty_model(directory)
    tensors = load_tensors(directory)
    layers = {}
    for name in linear_names(model):
        if f"{name}.qweight" in tensors:
            linear = model.get_submodule(name)
            layers[name] = _read_layer(name, linear.in_features, linear.out_features, group_size, tensors, directory)
    if not layers:
        raise CorruptFileError(f"{directory}: no '<layer>.qweight' tensor for any linear; it is not an AWQ checkpoint")
    return build_model(directory, model, layers, tensors, dtype=dtype, device=device, format_name=FORMAT,
                       quantization_config=qc)


def _read_layer(name, in_features, out_features, group_size, tensors, directory) -> LayerCodes:
    where = f"{directory}: {name}"
    size = in_features if group_size == -1 else group_size
    if in_features % size or out_features % 8:
        raise CorruptFileError(f"{where}: [{out_features}, {in_features}] does not fit AWQ's GEMM layout (g{size})")
    n_groups = in_features // size
    qweight = take(tensors, f"{name}.qweight", directory, FORMAT)
    qzeros = take(tensors, f"{name}.qzeros", directory, FORMAT)
    scales = take(tensors, f"{name}.scales", directory, FORMAT)
    for label, tensor, shape in (
        ("qweight", qweight, (in_features, out_features // 8)),
        ("qzeros", qzeros, (n_groups, out_features // 8)),
        ("scales", scales, (n_groups, out_features)),
    ):
        if tuple(tensor.shape) != shape:
            raise CorruptFileError(f"{where}.{label} is {list(tensor.shape)}, expected {list(shape)}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CorruptFileError(f"{where}: qweight / qzeros must be int32, got {qweight.dtype} / {qzeros.dtype}")
    codes = _unpack(qweight, out_features).T.contiguous()  # [out, in]
    zero = _unpack(qzeros, out_features).T.contiguous()  # [out, G]
    scale = scales.T.contiguous()
    symmetric = detect_symmetric(zero, BITS)
    scheme = scheme_for(BITS, None if group_size == -1 else size, symmetric, scale.dtype, where)
    return LayerCodes(scheme, codes, scale, zero)
