"""GPTQ v1 (``checkpoint_format: gptq``): the layout AutoGPTQ and GPTQModel write and transformers/vLLM load.

Per quantized linear ``<name>`` (``W [out, in]``, ``G`` groups along the input dim)::

    <name>.qweight  int32 [in*bits/32, out]     codes packed along the INPUT dim: column j of the matrix is
                                                 the LSB-first bit stream of row j of W's codes (3 bits: 32 codes
                                                 in 3 words, codes 10 and 21 straddling two words)
    <name>.qzeros   int32 [G, out*bits/32]      zero points MINUS ONE (the v1 convention), packed the same way
                                                 along the output dim
    <name>.scales   float16 [G, out]
    <name>.g_idx    int32 [in]                  the group of each input column: i // group_size
    <name>.bias     when the layer has one

Dequantization (every v1 loader): ``W[j, i] = scales[g, j] * (q[j, i] - (stored_zero[g, j] + 1))`` with
``g = g_idx[i]``; a symmetric model stores ``2**(bits-1) - 1``. ``config.json``'s ``quantization_config`` and
``quantize_config.json`` carry ``bits``, ``group_size`` (-1: one group per row), ``desc_act``, ``sym``,
``quant_method: gptq``, ``checkpoint_format: gptq``.

What the layout cannot hold, refused with the reason:

* a zero point of 0 (asymmetric groups whose weights are all >= 0): v1 stores zero-1 = -1, which AutoGPTQ's packer
  ORs over its neighbours and every v1 loader reads back as ``2**bits``;
* ``in_features`` or ``out_features`` not a multiple of 32: loaders size ``qweight`` as ``in // 32 * bits`` rows
  and ``qzeros`` as ``out // 32 * bits`` columns;
* a partial last group: the CUDA/exllama/marlin kernels and vLLM require ``in_features % group_size == 0``
  (SmolLM2's 576 columns with g128 -> use g64, or holdall's own format);
* codebooks (NF4/FP4), double-quantized or non-float16 scales, widths other than 2/3/4/8 bits.

The reader accepts v1 and ``gptq_v2`` (zeros stored as they are), ``g_idx`` equal to ``i // group_size``
(act-order with static groups, what holdall's GPTQ writes) and refuses a permuted ``g_idx`` (desc_act with
dynamic groups), which holdall's contiguous groups cannot hold.
"""

from __future__ import annotations

import os
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
    holdall_version,
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

FORMAT = "gptq"
BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG_FILE = "quantize_config.json"


def export_gptq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a holdall-quantized model as a GPTQ v1 checkpoint (qweight/qzeros/scales/g_idx); return the directory.

    Every decoder linear must be quantized with one int scheme of 2/3/4/8 bits and float16 scales (see the
    module docstring for what v1 cannot hold). Codes and scales are written as they are, never re-rounded.
    """
    layers = quantized_layers(model, FORMAT)
    scheme = uniform_scheme(model, layers, "GPTQ")
    check_exportable(model, list(layers), scheme)
    tensors = float_tensors(model, layers)
    for name, layer in layers.items():
        codes = layer_codes(layer)
        if not scheme.symmetric and bool((codes.zero == 0).any()):
            raise ConfigError(
                f"{name} has groups with zero point 0 (all their weights >= 0). GPTQ v1 stores zero-1, so 0 cannot "
                "be written: v1 loaders would read 2**bits. Re-quantize symmetric (--sym), or export with "
                "--format compressed-tensors (which stores zero points as they are)"
            )
        tensors.update(_layer_tensors(name, codes))
    config = _quantization_config(scheme)
    return write_checkpoint(out_dir, model, tensors, config, tokenizer, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, extra_json={QUANTIZE_CONFIG_FILE: config})


def check_exportable(model: nn.Module, names: list[str], scheme) -> None:
    """Refuse, before any work, quantizing linears ``names`` of ``model`` with ``scheme`` for a GPTQ v1 export."""
    require_decoder_linears(model, names, "GPTQ")
    refuse_unsupported_scheme(names[0], scheme, "GPTQ", bits=BITS, scale_dtypes=("float16",))
    for name in names:
        linear = model.get_submodule(name)
        _check_shape(name, linear.in_features, linear.out_features, scheme)


def _check_shape(name: str, in_features: int, out_features: int, scheme) -> None:
    if in_features % 32 or out_features % 32:
        raise ConfigError(
            f"{name} is [{out_features}, {in_features}]; GPTQ packs 32 codes into bits int32 words along both "
            "dims, so in_features and out_features must be multiples of 32. Export with --format "
            "compressed-tensors, or keep the model in holdall's own format"
        )
    if scheme.granularity == "group" and in_features % scheme.group_size:
        raise ConfigError(
            f"{name} has {in_features} input columns, not a multiple of group_size {scheme.group_size}: its last "
            "group is partial, and GPTQ kernels (exllama, marlin, vLLM) require whole groups. Re-quantize with a "
            f"group size dividing {in_features} (e.g. --group-size "
            f"{dividing_group_size(in_features, scheme.group_size)}), or keep the model in holdall's own format"
        )


def _layer_tensors(name: str, layer: LayerCodes) -> dict[str, torch.Tensor]:
    bits = layer.scheme.bits
    group_size = layer.scheme.group_size if layer.scheme.granularity == "group" else layer.in_features
    return {
        f"{name}.qweight": pack_int32(layer.codes, bits).T.contiguous(),  # [in*bits/32, out]
        f"{name}.qzeros": pack_int32(layer.zero.T.to(torch.int64) - 1, bits),  # [G, out*bits/32], zero - 1
        f"{name}.scales": layer.scale.T.contiguous(),  # [G, out]
        f"{name}.g_idx": (torch.arange(layer.in_features) // group_size).to(torch.int32),
    }


def _quantization_config(scheme) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size if scheme.granularity == "group" else -1,
        "desc_act": False,  # groups are contiguous column ranges: g_idx = i // group_size
        "static_groups": False,
        "sym": scheme.symmetric,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "pack_dtype": "int32",
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "meta": {"quantizer": [f"holdall:{holdall_version()}"]},
    }


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def load_gptq(
    directory: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A GPTQ checkpoint (v1 ``gptq`` or ``gptq_v2``) -> a holdall model whose quantized linears are ``QuantLinear``.

    Every linear with a ``qweight`` tensor becomes a QuantLinear with the file's codes, scales and zero points
    (a layer whose zeros are all the midpoint is held as holdall's symmetric scheme: same weights).
    """
    directory = Path(directory)
    qc = read_config_json(directory)["quantization_config"]
    if qc.get("quant_method") != "gptq":
        raise CorruptFileError(f"{directory}/config.json: quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    version = qc.get("checkpoint_format") or "gptq"
    if version not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(
            f"{directory}: GPTQ checkpoint_format {version!r}; holdall reads 'gptq' (v1) and 'gptq_v2'"
        )
    bits = qc.get("bits")
    if bits not in BITS:
        raise UnsupportedModelError(f"{directory}: GPTQ bits={bits!r}; holdall reads {BITS}")
    if qc.get("dynamic"):
        raise UnsupportedModelError(
            f"{directory}: per-module 'dynamic' GPTQ overrides are not supported; load it with GPTQModel"
        )
    group_size = int(qc.get("group_size", 128))
    model = empty_model(directory)
    tensors = load_tensors(directory)
    layers = {}
    for name in linear_names(model):
        if f"{name}.qweight" in tensors:
            linear = model.get_submodule(name)
            layers[name] = _read_layer(name, linear.in_features, linear.out_features, bits, group_size,
                                       version, tensors, directory)
    if not layers:
        raise CorruptFileError(f"{directory}: no '<layer>.qweight' tensor for any linear; it is not a GPTQ checkpoint")
    return build_model(directory, model, layers, tensors, dtype=dtype, device=device, format_name=FORMAT,
                       quantization_config=qc)


def _read_layer(name, in_features, out_features, bits, group_size, version, tensors, directory) -> LayerCodes:
    where = f"{directory}: {name}"
    qweight = take(tensors, f"{name}.qweight", directory, FORMAT)
    qzeros = take(tensors, f"{name}.qzeros", directory, FORMAT)
    scales = take(tensors, f"{name}.scales", directory, FORMAT)
    g_idx = tensors.pop(f"{name}.g_idx", None)
    per_row = group_size == -1
    size = in_features if per_row else group_size
    n_groups = -(-in_features // size)
    for label, tensor, shape in (
        ("qweight", qweight, (-(-in_features * bits // 32), out_features)),
        ("qzeros", qzeros, (n_groups, -(-out_features * bits // 32))),
        ("scales", scales, (n_groups, out_features)),
    ):
        if tuple(tensor.shape) != shape:
            raise CorruptFileError(f"{where}.{label} is {list(tensor.shape)}, expected {list(shape)} "
                                   f"(bits={bits}, group_size={group_size}, weight [{out_features}, {in_features}])")
    if g_idx is not None:
        expected = torch.arange(in_features) // size
        if not torch.equal(g_idx.long().cpu(), expected):
            raise UnsupportedModelError(
                f"{where}: g_idx is not i // group_size (act-order with dynamic groups): its groups are not "
                "contiguous column ranges, which holdall's layout requires. Re-quantize with static groups "
                "(desc_act with static_groups=True, or holdall's --act-order), or load it with GPTQModel"
            )
    codes = unpack_int32(qweight.T.contiguous(), bits, in_features)  # [out, in]
    zero = unpack_int32(qzeros, bits, out_features).T.to(torch.int64)  # [out, G]
    if version == "gptq":
        zero = zero + 1  # v1 stores zero - 1
    if bool((zero > 2**bits - 1).any()):
        raise UnsupportedModelError(
            f"{where}: a stored zero point of {2**bits - 1} means zero {2**bits} in the v1 convention (a zero of 0 "
            f"that wrapped when the checkpoint was written); no {bits}-bit code can hold it. Re-export the model "
            "as gptq_v2 or compressed-tensors"
        )
    zero = zero.to(torch.uint8).contiguous()
    scale = scales.T.contiguous()
    symmetric = detect_symmetric(zero, bits)
    scheme = scheme_for(bits, None if per_row else group_size, symmetric, scale.dtype, where)
    return LayerCodes(scheme, codes, scale, zero)
