"""Dequantizing base weights for training: a linear's float weight, a block of its rows, or several linears
stacked row-wise in one ``[sum(out), in]`` buffer.

The fast QLoRA step (``training.fast_step``) decodes one base weight at a time for its forward GEMM and a block
of rows at a time for the input gradient (``weight_rows``), so that few float weights exist at once. Each layer
is decoded straight into its buffer:

* a CUDA ``QuantLinear`` the 4-bit kernels read -> ``triton_dequant`` (one pass, 2 output bytes per weight);
* any other ``QuantLinear`` -> ``core.backends.dequantize_for_compute`` (the plain-torch path, bit-identical to
  ``QuantLinear.dequantize_weight``), copied in;
* a float ``nn.Linear`` -> its weight, cast and copied in (a single float linear is returned as is, no copy).

Needs only torch until a CUDA launch imports Triton.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core import backends
from . import available, packed
from .dispatch import layer_plan


_OPS_ATTR = "_holdall_dequant_ops"  # (plan, operands) cached on the layer: training dequantizes it 3x a step


def use_kernel(layer: nn.Module, device: torch.device) -> bool:
    """Whether ``layer``'s weight is decoded by the Triton kernel on ``device``."""
    if device.type != "cuda" or not hasattr(layer, "scheme") or not layer.qdata.is_cuda:
        return False
    same = device.index is None or layer.qdata.device == device  # torch.device("cuda") means the current one
    return same and available() and layer_plan(layer) is not None


def dequantize_into(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``layer``'s float weight written into ``out`` (contiguous ``[out_features, in_features]``, float dtype)."""
    if not hasattr(layer, "scheme"):  # a float nn.Linear
        return out.copy_(layer.weight)
    if use_kernel(layer, out.device):
        from . import triton_dequant  # only now is Triton imported

        p, ops = _operands(layer)
        return triton_dequant.dequantize(ops, p, out)
    return out.copy_(backends.dequantize_for_compute(layer, out.dtype))


def weight_rows(layer: nn.Module, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``layer``'s float weight, ``[stop - start, in_features]`` in ``dtype`` on ``device``.

    The Triton kernel decodes only those rows; a float layer of the right dtype gives a view (no copy); the
    plain-torch path decodes the whole weight and copies the rows out.
    """
    if not hasattr(layer, "scheme"):
        return layer.weight[start:stop].to(device=device, dtype=dtype)
    out = torch.empty(stop - start, layer.in_features, dtype=dtype, device=device)
    if use_kernel(layer, out.device):
        from . import triton_dequant

        p, ops = _operands(layer)
        return triton_dequant.dequantize(ops, p, out, row0=start, rows=stop - start)
    return out.copy_(backends.dequantize_for_compute(layer, dtype)[start:stop])


def _operands(layer: nn.Module):
    """``(plan, kernel operands)`` of a CUDA ``QuantLinear``, cached on the layer until its plan changes."""
    p = layer_plan(layer)
    cached = layer.__dict__.get(_OPS_ATTR)
    if cached is None or cached[0] is not p:  # a new plan (new buffers): new views
        cached = layer.__dict__[_OPS_ATTR] = (p, packed.operands(layer, p))
    return cached


def stacked_weight(layers: Sequence[nn.Module], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The layers' weights stacked row-wise, ``[sum(out_features), in_features]`` in ``dtype`` on ``device``.

    All layers must share ``in_features`` (they read the same input). A single float layer of the right dtype
    is returned without a copy.
    """
    if len(layers) == 1 and not hasattr(layers[0], "scheme") and layers[0].weight.dtype == dtype:
        return layers[0].weight
    in_features = layers[0].in_features
    rows = sum(layer.out_features for layer in layers)
    out = torch.empty(rows, in_features, dtype=dtype, device=device)
    start = 0
    for layer in layers:
        stop = start + layer.out_features
        dequantize_into(layer, out[start:stop])
        start = stop
    return out
