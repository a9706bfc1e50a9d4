"""``QuantizedTensor``: a weight stored as packed codes plus scales, described by a ``QuantScheme``.

It is a plain container of named tensors (no tensor subclass): the names are the storage format,
shared by ``QuantLinear`` buffers, ``state_dict`` keys and the checkpoint files.

Names, shapes and dtypes (``R x G`` is the scale grid of ``core.affine.qparams_shape``):

====================  ==========================================  =================================
name                  int scheme (2-D ``[out, in]``)              nf4 / fp4 (any shape, flattened)
====================  ==========================================  =================================
``qdata``             uint8 ``[out, ceil(in*bits/8)]``            uint8 ``[ceil(numel/2), 1]``
``scale``             scale_dtype ``[R, G]``                      float32 ``[ceil(numel/block)]``
``zero`` (asym)       uint8 ``[R, ceil(G*bits/8)]`` (packed)      --
====================  ==========================================  =================================

With ``double_quant`` the ``scale`` tensor becomes uint8 codes of the same shape, plus
``scale_absmax`` float32 ``[ceil(n_scales/256)]`` and ``scale_offset`` float32 ``[]`` (a scalar).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import ConfigError, CorruptFileError, DataError
from . import affine, codebook
from .packing import pack, packed_size, unpack
from .scheme import DOUBLE_QUANT_BLOCK, QuantScheme

TensorSpec = tuple[tuple[int, ...], torch.dtype]


def tensor_specs(shape: Iterable[int], scheme: QuantScheme) -> dict[str, TensorSpec]:
    """The ``{name: (shape, dtype)}`` a weight of ``shape`` takes under ``scheme``: the storage layout."""
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if numel == 0:
        raise ConfigError(f"cannot quantize an empty tensor of shape {shape}")
    specs: dict[str, TensorSpec] = {}
    if scheme.is_codebook:
        specs["qdata"] = ((packed_size(numel, 4), 1), torch.uint8)
        scale_shape: tuple[int, ...] = (codebook.n_blocks(numel, scheme.group_size),)
    else:
        out_features, in_features = affine._check_shape(shape)
        specs["qdata"] = ((out_features, packed_size(in_features, scheme.bits)), torch.uint8)
        scale_shape = affine.qparams_shape(shape, scheme)
        if not scheme.symmetric:
            specs["zero"] = ((scale_shape[0], packed_size(scale_shape[1], scheme.bits)), torch.uint8)
    if scheme.double_quant:
        specs["scale"] = (scale_shape, torch.uint8)
        specs["scale_absmax"] = ((codebook.n_blocks(math.prod(scale_shape), DOUBLE_QUANT_BLOCK),), torch.float32)
        specs["scale_offset"] = ((), torch.float32)
    else:
        specs["scale"] = (scale_shape, scheme.torch_scale_dtype)
    return specs


class QuantizedTensor:
    """Packed codes + scales for one weight. Build with :meth:`from_float` or :meth:`from_tensors`."""

    def __init__(self, shape: Iterable[int], scheme: QuantScheme, tensors: dict[str, torch.Tensor]):
        # Unchecked: internal callers pass tensors they built to spec; outside data goes through from_tensors.
        self.shape = torch.Size(tuple(int(d) for d in shape))
        self.scheme = scheme
        self._tensors = dict(tensors)

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w: torch.Tensor, scheme: QuantScheme) -> "QuantizedTensor":
        """Quantize a float tensor (int schemes: 2-D ``[out, in]``; nf4/fp4: any shape)."""
        if not isinstance(scheme, QuantScheme):
            raise ConfigError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
        if not isinstance(w, torch.Tensor) or not torch.is_floating_point(w):
            raise DataError(f"only floating-point tensors can be quantized, got {getattr(w, 'dtype', type(w))}")
        tensor_specs(w.shape, scheme)  # validates the shape for this scheme
        w = w.detach()
        affine.check_finite(w)
        if scheme.is_codebook:
            qdata, scale = codebook.quantize_4bit(w, scheme.dtype, scheme.group_size)
            tensors = {"qdata": qdata, **_store_scale(scale, scheme)}
        else:
            tensors = _quantize_int(w, scheme)
        return cls(w.shape, scheme, tensors)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: Iterable[int], scheme: QuantScheme
    ) -> "QuantizedTensor":
        """Wrap stored tensors, checking names, shapes and dtypes against the scheme's layout."""
        shape = tuple(int(d) for d in shape)
        specs = tensor_specs(shape, scheme)
        hint = (
            f"the data does not match a {scheme.label} tensor of shape {list(shape)}; the file is damaged or "
            "was written with another scheme/shape (check holdall_quant.json, or re-quantize the float model)"
        )
        missing = sorted(set(specs) - set(tensors))
        extra = sorted(set(tensors) - set(specs))
        if missing or extra:
            raise CorruptFileError(f"{hint}: missing tensors {missing}, unexpected tensors {extra}")
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise CorruptFileError(f"quantized tensors are spread over devices {sorted(map(str, devices))}; move them to one")
        for name, (want_shape, want_dtype) in specs.items():
            got = tensors[name]
            if tuple(got.shape) != want_shape or got.dtype != want_dtype:
                raise CorruptFileError(
                    f"{hint}: '{name}' is {got.dtype} {list(got.shape)}, expected {want_dtype} {list(want_shape)}"
                )
        return cls(shape, scheme, {name: tensors[name] for name in specs})

    @staticmethod
    def empty_tensors(
        shape: Iterable[int], scheme: QuantScheme, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Zero-filled tensors with the right names, shapes and dtypes (placeholders to load into)."""
        return {
            name: torch.zeros(spec_shape, dtype=dtype, device=device)
            for name, (spec_shape, dtype) in tensor_specs(shape, scheme).items()
        }

    # --- use -----------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor these codes stand for, computed in float32 and returned as ``dtype``."""
        scheme, t = self.scheme, self._tensors
        scale = self.scales()
        if scheme.is_codebook:
            return codebook.dequantize_4bit(t["qdata"], scale, scheme.dtype, scheme.group_size, self.shape, dtype)
        out_features, in_features = self.shape
        codes = unpack(t["qdata"], scheme.bits, in_features)  # [out, in]
        zero = None if scheme.symmetric else unpack(t["zero"], scheme.bits, scale.shape[1])  # [R, G]
        return affine.dequantize_affine(codes, scale, zero, scheme, dtype)

    def scales(self) -> torch.Tensor:
        """The effective scales as float32 (double-quantized ones decoded): ``[R, G]`` or ``[n_blocks]``."""
        t = self._tensors
        if self.scheme.double_quant:
            return codebook.double_dequantize(t["scale"], t["scale_absmax"], t["scale_offset"])
        return t["scale"].float()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (a new dict; the tensors themselves are shared, not copied)."""
        return dict(self._tensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors together."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales and zeros included: ``8 * nbytes / numel``."""
        return 8 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return self._tensors["qdata"].device

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy on ``device`` (dtypes never change: they are the format)."""
        return QuantizedTensor(self.shape, self.scheme, {k: v.to(device) for k, v in self._tensors.items()})

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={list(self.shape)}, scheme={self.scheme.label}, "
            f"bits_per_weight={self.bits_per_weight:.3f}, device={self.device})"
        )


def _quantize_int(w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Affine int path: scales (optionally double-quantized) first, then zeros and codes from the stored scales."""
    scale = affine.choose_scale(w, scheme)  # [R, G] scale_dtype
    stored = _store_scale(scale, scheme)
    effective = codebook.double_dequantize(
        stored["scale"], stored["scale_absmax"], stored["scale_offset"]
    ) if scheme.double_quant else scale
    zero = affine.choose_zero(w, effective, scheme)  # [R, G] uint8 or None
    codes = affine.quantize_affine(w, effective, zero, scheme)  # [out, in] uint8
    tensors = {"qdata": pack(codes, scheme.bits), **stored}
    if zero is not None:
        tensors["zero"] = pack(zero, scheme.bits)
    return tensors


def _store_scale(scale: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """``{"scale": ...}``, or with double quantization ``{"scale": uint8, "scale_absmax", "scale_offset"}``."""
    if not scheme.double_quant:
        return {"scale": scale}
    codes, nested_absmax, offset = codebook.double_quantize(scale)
    return {"scale": codes, "scale_absmax": nested_absmax, "scale_offset": offset}
