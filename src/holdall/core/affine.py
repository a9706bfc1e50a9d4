"""Affine integer quantization: pure functions on 2-D weights ``[out_features, in_features]``.

Conventions (docs/architecture.md, "Integer conventions"), with ``maxq = 2**bits - 1``:

* symmetric: ``scale = absmax / (maxq / 2)``, implicit zero ``2**(bits-1)``;
* asymmetric: the range always includes 0, ``scale = (max - min) / maxq``,
  ``zero = clamp(round(-min / scale), 0, maxq)``;
* ``q = clamp(round(w / scale) + zero, 0, maxq)`` and ``w ~ (q - zero) * scale``.

Scales are rounded to the scheme's ``scale_dtype`` *before* codes are computed, so the stored scales
reproduce the stored codes exactly. ``torch.round`` rounds halves to even, as GPTQ does.

Granularity decides the shape of ``scale`` / ``zero``:
``"group"`` -> ``[out, ceil(in / group_size)]`` (the last group of a row may be partial),
``"channel"`` -> ``[out, 1]``, ``"tensor"`` -> ``[1, 1]``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from .scheme import QuantScheme


def qparams_shape(shape: tuple[int, int] | torch.Size, scheme: QuantScheme) -> tuple[int, int]:
    """Shape of ``scale`` (and of the unpacked ``zero``) for a weight of ``shape = (out, in)``."""
    out_features, in_features = _check_shape(shape)
    if scheme.granularity == "group":
        return out_features, -(-in_features // scheme.group_size)
    if scheme.granularity == "channel":
        return out_features, 1
    return 1, 1


def choose_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-group scales ``[R, G]`` (see :func:`qparams_shape`), already rounded to ``scale_dtype``.

    A group of zeros (or one so small its scale underflows) gets the dtype's smallest normal number instead
    of 0, so no division by zero happens and its codes land on the zero point (dequantizing to exactly 0).
    """
    _check_int_scheme(scheme)
    check_finite(w)
    maxq = 2**scheme.bits - 1
    groups = _group_view(w, scheme)  # [R, G, L] float32, zero-padded
    if scheme.symmetric:
        scale = groups.abs().amax(dim=-1) / (maxq / 2)
    else:
        hi = groups.amax(dim=-1).clamp(min=0)
        lo = groups.amin(dim=-1).clamp(max=0)
        scale = (hi - lo) / maxq
    dtype = scheme.torch_scale_dtype
    scale = scale.to(dtype)
    if not torch.isfinite(scale).all():
        raise ConfigError(
            f"weights up to {float(w.abs().max()):.3g} overflow {scheme.scale_dtype} scales; "
            "use scale_dtype='float32' (or 'bfloat16')"
        )
    tiny = torch.finfo(dtype).tiny
    return torch.where(scale == 0, torch.full_like(scale, tiny), scale)


def choose_zero(w: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
    """Asymmetric zero points, uint8 ``[R, G]`` in ``[0, maxq]``, from the *stored* scales; None when symmetric."""
    _check_int_scheme(scheme)
    if scheme.symmetric:
        return None
    maxq = 2**scheme.bits - 1
    lo = _group_view(w, scheme).amin(dim=-1).clamp(max=0)  # [R, G]
    zero = torch.round(-lo / _safe(scale.float()))
    return zero.clamp(0, maxq).to(torch.uint8)


def choose_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale [R, G] in scale_dtype, zero uint8 [R, G] or None)`` for ``w [out, in]``."""
    scale = choose_scale(w, scheme)
    return scale, choose_zero(w, scale, scheme)


def quantize_affine(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Codes ``q = clamp(round(w / scale) + zero, 0, maxq)``: uint8 ``[out, in]`` (unpacked)."""
    _check_int_scheme(scheme)
    check_finite(w)
    maxq = 2**scheme.bits - 1
    s = expand_qparams(_safe(scale.float()), w.shape, scheme)
    z = _zero_or_midpoint(zero, scheme, w.shape)
    q = torch.round(w.float() / s) + z
    return q.clamp(0, maxq).to(torch.uint8)


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``w = (q - zero) * scale`` computed in float32, returned as ``dtype`` ``[out, in]``."""
    _check_int_scheme(scheme)
    s = expand_qparams(scale.float(), codes.shape, scheme)
    z = _zero_or_midpoint(zero, scheme, codes.shape)
    return ((codes.float() - z) * s).to(dtype)


def expand_qparams(p: torch.Tensor, shape: tuple[int, int] | torch.Size, scheme: QuantScheme) -> torch.Tensor:
    """Broadcast per-group values ``[R, G]`` against a weight ``[out, in]``."""
    _, in_features = _check_shape(shape)
    if p.shape[1] == 1:
        return p  # [out, 1] or [1, 1] (channel, tensor, or a single group) broadcasts as is
    return p.repeat_interleave(scheme.group_size, dim=1)[:, :in_features]


def check_finite(w: torch.Tensor) -> None:
    """Refuse NaN/Inf weights: they would poison a whole group's scale."""
    if not torch.is_floating_point(w):
        raise DataError(f"weights must be a floating-point tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise DataError(
            f"the weight has {bad} NaN/Inf value(s); quantizing would corrupt its scales. "
            "Fix the checkpoint (or the training run that produced it) before quantizing"
        )


def _group_view(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w`` as float32 groups ``[R, G, L]``; a partial last group is padded with zeros.

    Zero padding never changes a group's parameters: symmetric uses |w|, and the asymmetric range is
    widened to include 0 anyway.
    """
    out_features, in_features = _check_shape(w.shape)
    w = w.float()
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if scheme.granularity == "channel":
        return w.reshape(out_features, 1, in_features)
    g = scheme.group_size
    n_groups = -(-in_features // g)
    if n_groups * g != in_features:
        w = torch.cat([w, w.new_zeros(out_features, n_groups * g - in_features)], dim=1)
    return w.reshape(out_features, n_groups, g)


def _zero_or_midpoint(zero: torch.Tensor | None, scheme: QuantScheme, shape) -> torch.Tensor | float:
    if scheme.symmetric:
        return float(2 ** (scheme.bits - 1))
    if zero is None:
        raise ConfigError("an asymmetric scheme needs zero points; pass the zero returned by choose_qparams")
    return expand_qparams(zero.float(), shape, scheme)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Replace a zero scale by +inf so that ``w / scale`` is 0 (only reachable with double-quantized scales)."""
    return torch.where(scale == 0, torch.full_like(scale, float("inf")), scale)


def _check_int_scheme(scheme: QuantScheme) -> None:
    if scheme.dtype != "int":
        raise ConfigError(f"affine quantization is for dtype='int' schemes, got {scheme.label}; use core.codebook")


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ConfigError(
            f"integer quantization works on 2-D weights [out_features, in_features], got shape {tuple(shape)}; "
            "reshape the tensor or use an nf4/fp4 scheme (which flattens)"
        )
    return int(shape[0]), int(shape[1])
