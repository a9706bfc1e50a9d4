"""CPU backend for 4-bit integer ``QuantLinear``s in bf16: torch's own int4 matmul, no dequantized weight.

The reference backend dequantizes the whole weight on every call; for a decode step (one row) that costs ~20x the
matmul (a 1536 x 576 layer on this project's 2-core CPU: 847 us against 35 us here, and 71 us for the fp32 dense
matmul; ``benchmarks/cpu_int4_matmul.py``). PyTorch's CPU
build ships an int4 matmul (``aten._weight_int4pack_mm_for_cpu``, the kernel gpt-fast and torchao use on CPU) that
reads 4-bit codes in its own packed layout with a ``(scale, zero)`` pair per group and output:
``W = (q - 8) * scale + zero``. holdall's int4 maps onto it exactly: symmetric ``(q - 8) * s`` (zero 0),
asymmetric ``(q - z) * s = (q - 8) * s + (8 - z) * s``, channel / tensor scales repeated over groups, double-quantized
scales decoded. The repacked codes and the bf16 ``(scale, zero)`` table are made once per layer and cached on it
(4 bits per weight more, rebuilt when a buffer changes).

It claims a layer where it is faster (measured on this project's CPU machine): bf16 compute, at most
:data:`MAX_ROWS` rows (from ~128 rows dequantize + one bf16 matmul wins), no gradient wanted through ``x``
(training keeps the reference's ``DequantLinearFunction``), groups of 32..256 that tile the row.

**Opt-in** (:func:`enable`, the :func:`enabled` context, ``holdall.generate(..., cpu_int4=True)``, ``holdall
generate --cpu-int4``): its numbers are the kernel's -- bf16 scales, its own accumulation order -- within bf16
rounding of the reference (tested), not bit-identical to it, and holdall's CPU default stays bit-identical to
transformers and the checkpoint formats' own libraries (tests compare logits with ``torch.equal``). Torch only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..core import backends
from ..core.packing import unpack

BACKEND = "torch-int4-cpu"
#: Rows up to which the int4 kernel beats the reference's dequantize + bf16 matmul (1536 x 576, group 64,
#: benchmarks/cpu_int4_matmul.py: 35 vs 847 us at 1 row, 186 vs 986 at 16, 729 vs 1082 at 64, 1415 vs 1333 at 128).
MAX_ROWS = 64
#: Above the reference; below the GPU kernels' backend (they never claim CPU tensors anyway).
PRIORITY = 5.0
_GROUPS = (256, 128, 64, 32)
_CACHE_ATTR = "_holdall_int4_cpu"


def available() -> bool:
    """Whether this torch build has the CPU int4 kernels."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def why_unsupported(layer: torch.nn.Module) -> str | None:
    """None when the int4 kernel can run this layer; otherwise the reason."""
    scheme = getattr(layer, "scheme", None)
    if scheme is None:
        return "not a QuantLinear"
    if scheme.dtype != "int" or scheme.bits != 4:
        return f"{scheme.label}: the CPU int4 kernel reads 4-bit integer codes only"
    if _group(layer) is None:
        return (f"in_features={layer.in_features} is not a whole number of groups of {scheme.group_size}"
                if scheme.granularity == "group" else
                f"in_features={layer.in_features} has no group size in {_GROUPS} that tiles it")
    return None


def _group(layer: torch.nn.Module) -> int | None:
    """The kernel's group size for this layer: the scheme's groups, or any size tiling the row for channel /
    tensor scales (repeated over the groups)."""
    scheme, k = layer.scheme, layer.in_features
    if scheme.granularity == "group":
        return scheme.group_size if scheme.group_size in _GROUPS and k % scheme.group_size == 0 else None
    return next((g for g in _GROUPS if k % g == 0), None)


def supports(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or not hasattr(layer, "scheme") or layer.qdata.device.type != "cpu":
        return False
    if backends.compute_dtype(x) != torch.bfloat16:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > MAX_ROWS:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False  # the reference's DequantLinearFunction has the backward (a bias's gradient flows through +)
    return _cached(layer) is not None


def _cached(layer: torch.nn.Module):
    """``(group, packed codes, bf16 (scale, zero) [G, out, 2])`` for the layer, or None; rebuilt when a buffer is
    replaced or changed in place (the key holds the buffers' addresses and versions)."""
    key = tuple((layer._buffers[n].data_ptr(), layer._buffers[n]._version) for n in layer._weight_names)
    cached = layer.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = None if why_unsupported(layer) is not None else _prepare(layer)
    layer.__dict__[_CACHE_ATTR] = (key, value)
    return value


def _prepare(layer: torch.nn.Module):
    out_features, in_features = layer.out_features, layer.in_features
    group = _group(layer)
    n_groups = in_features // group
    codes = unpack(layer.qdata.reshape(out_features, -1), 4, in_features).to(torch.int32)  # [out, in] 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = layer.quantized_weight.scales()  # [R, G'] float32, R in {1, out}, G' in {1, n_groups}
    if layer.scheme.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (8.0 - unpack(layer.zero, 4, scale.shape[1]).float()) * scale  # (q - z) s = (q - 8) s + (8 - z) s
    table = torch.stack([scale.expand(out_features, n_groups), zero.expand(out_features, n_groups)], dim=-1)
    return group, packed, table.transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]


def forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T + b`` in bf16 by torch's CPU int4 kernel; x ``[..., in]``."""
    group, packed, table = _cached(layer)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, table)
    if layer.bias is not None:
        y = y + layer.bias.to(torch.bfloat16)
    return y.reshape(*lead, layer.out_features)


def enable(force: bool = False) -> bool:
    """Register the backend when this torch build has the kernels. Returns whether it is registered."""
    if not (force or available()):
        return False
    backends.register_backend(BACKEND, forward, supports, PRIORITY, replace=True)
    return True


def disable() -> None:
    if BACKEND in backends.available_backends():
        backends.unregister_backend(BACKEND)


@contextlib.contextmanager
def enabled() -> Iterator[bool]:
    """The backend registered inside the ``with`` block (and removed after, unless it was registered before);
    yields whether it is available."""
    before = BACKEND in backends.available_backends()
    on = enable()
    try:
        yield on
    finally:
        if on and not before:
            disable()

