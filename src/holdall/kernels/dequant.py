"""Dequantizing base weights for training: a linear's float weight, or a block of its rows.

The fast QLoRA step (``training.fast_step``) decodes one base weight at a time for its forward GEMM and, where
the kernel runs, a block of rows at a time for the input gradient, so that few float weights exist at once:

* a CUDA ``QuantLinear`` the 4-bit kernels read -> ``triton_dequant`` (one pass, 2 output bytes per weight; any
  range of rows);
* any other ``QuantLinear`` -> ``core.backends.dequantize_for_compute`` (the plain-torch path, bit-identical to
  ``QuantLinear.dequantize_weight``; always the whole weight);
* a float ``nn.Linear`` -> its weight (a view when dtype and device already match).

Needs only torch until a CUDA launch imports Triton.
"""

from __future__ import annotations

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


def weight_rows(layer: nn.Module, dtype: torch.dtype, device: torch.device, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (default: all) of ``layer``'s float weight, ``[rows, in_features]`` in ``dtype`` on
    ``device``. Only the Triton kernel decodes just those rows (:func:`decodes_rows`); the plain-torch path
    decodes the whole weight and returns a view of the rows."""
    stop = layer.out_features if stop is None else stop
    if not hasattr(layer, "scheme"):  # a float nn.Linear
        return layer.weight[start:stop].to(device=device, dtype=dtype)
    if decodes_rows(layer, device):
        from . import triton_dequant  # only now is Triton imported

        out = torch.empty(stop - start, layer.in_features, dtype=dtype, device=device)
        p, ops = _operands(layer)
        return triton_dequant.dequantize(ops, p, out, row0=start, rows=stop - start)
    return backends.dequantize_for_compute(layer, dtype).to(device)[start:stop]


def decodes_rows(layer: nn.Module, device: torch.device) -> bool:
    """Whether a block of ``layer``'s rows costs only those rows (the kernel) rather than the whole weight."""
    return hasattr(layer, "scheme") and use_kernel(layer, device)


def _operands(layer: nn.Module):
    """``(plan, kernel operands)`` of a CUDA ``QuantLinear``, cached on the layer until its plan changes."""
    p = layer_plan(layer)
    cached = layer.__dict__.get(_OPS_ATTR)
    if cached is None or cached[0] is not p:  # a new plan (new buffers): new views
        cached = layer.__dict__[_OPS_ATTR] = (p, packed.operands(layer, p))
    return cached
