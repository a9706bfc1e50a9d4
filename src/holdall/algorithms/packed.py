"""Turn an algorithm's integer codes and quantization parameters into a core ``QuantLinear``.

GPTQ and HQQ choose their codes themselves (error feedback, optimized zero points) instead of rounding the float
weight, so they cannot use ``QuantLinear.from_linear``. They hand the *unpacked* codes and the parameters to
:func:`quant_linear_from_codes`, which packs them into the core int format and checks the result against the
scheme's storage layout: everything downstream (save/load, eval, LoRA, export) sees an ordinary ``QuantLinear``.
"""

from __future__ import annotations

import torch
from torch import nn

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
    """
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
    layer = QuantLinear(
        in_features, out_features, scheme, bias=linear.bias is not None, dtype=linear.weight.dtype, device="meta"
    )
    state = qweight.tensors()
    if linear.bias is not None:
        state["bias"] = linear.bias.detach().clone()
    # assign=True installs these tensors in place of the meta placeholders (no copy, no float weight allocated)
    layer.load_state_dict(state, assign=True)
    return layer
