"""Turn an algorithm's integer codes and quantization parameters into a core ``QuantLinear``.

GPTQ and HQQ choose their codes themselves (error feedback, optimized zero points) instead of rounding the float
weight, so they cannot use ``QuantLinear.from_linear``. They hand the *unpacked* codes and the parameters to
:func:`quant_linear_from_codes`, which packs them into the core int format and checks the result against the
scheme's storage layout: everything downstream (save/load, eval, LoRA, export) sees an ordinary ``QuantLinear``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import codebook
from ..core.linear import QuantLinear
from ..core.packing import pack
from ..core.qtensor import QuantizedTensor
from ..core.scheme import QuantScheme
from ..errors import ConfigError


def quant_linear_from_codes(
    linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> QuantLinear:
    """A ``QuantLinear`` holding ``codes`` for ``linear``'s weight (bias copied, same device and dtype).

    codes: uint8 ``[out, in]`` in ``[0, 2**bits)``; scale: ``[R, G]`` (already in ``scheme.scale_dtype``, the
    scales the codes were computed with); zero: uint8 ``[R, G]`` for asymmetric schemes, else None.
    nf4/fp4 schemes (± double quant): codes are indices into the codebook ``[out, in]`` and scale the raw float32
    block absmax ``[out, in / block]`` (blocks inside rows); double quantization is applied here, as
    ``QuantizedTensor.from_float`` applies it, so the bytes have exactly the RTN layout.
    """
    if scheme.is_codebook:
        return _codebook_linear(linear, codes, scale, scheme)
    if scheme.dtype != "int" or scheme.double_quant:
        raise ConfigError(f"codes can be stored only under plain int schemes (no double quant), got {scheme.label}")
    out_features, in_features = linear.weight.shape
    if tuple(codes.shape) != (out_features, in_features):
        raise ConfigError(f"codes {tuple(codes.shape)} do not match the weight {(out_features, in_features)}")
    tensors = {"qdata": pack(codes.to(torch.uint8), scheme.bits), "scale": scale.to(scheme.torch_scale_dtype)}
    if not scheme.symmetric:
        if zero is None:
            raise ConfigError("an asymmetric scheme needs zero points")
        tensors["zero"] = pack(zero.to(torch.uint8), scheme.bits)
    qweight = QuantizedTensor.from_tensors(tensors, (out_features, in_features), scheme)  # checks the layout
    return _install(linear, qweight, scheme)


def _codebook_linear(linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> QuantLinear:
    out_features, in_features = linear.weight.shape
    if tuple(codes.shape) != (out_features, in_features):
        raise ConfigError(f"codes {tuple(codes.shape)} do not match the weight {(out_features, in_features)}")
    if in_features % scheme.group_size or tuple(scale.shape) != (out_features, in_features // scheme.group_size):
        raise ConfigError(
            f"{scheme.label} block scales must be [out, in / {scheme.group_size}] with whole blocks in each row; got "
            f"{tuple(scale.shape)} for a weight {(out_features, in_features)}"
        )
    flat_scale = scale.reshape(-1).float().contiguous()
    tensors = {"qdata": pack(codes.reshape(-1).to(torch.uint8), 4).reshape(-1, 1)}
    if scheme.double_quant:
        q, nested, offset = codebook.double_quantize(flat_scale)
        tensors.update(scale=q, scale_absmax=nested, scale_offset=offset)
    else:
        tensors["scale"] = flat_scale
    return _install(linear, QuantizedTensor.from_tensors(tensors, (out_features, in_features), scheme), scheme)


def _install(linear: nn.Linear, qweight: QuantizedTensor, scheme: QuantScheme) -> QuantLinear:
    out_features, in_features = linear.weight.shape
    layer = QuantLinear(
        in_features, out_features, scheme, bias=linear.bias is not None, dtype=linear.weight.dtype, device="meta"
    )
    state = qweight.tensors()
    if linear.bias is not None:
        state["bias"] = linear.bias.detach().clone()
    # assign=True installs these tensors in place of the meta placeholders (no copy, no float weight allocated)
    layer.load_state_dict(state, assign=True)
    return layer
