"""``QuantLinear``: a drop-in ``nn.Linear`` replacement whose weight is a packed ``QuantizedTensor``.

The weight's tensors are buffers named exactly like ``QuantizedTensor.tensors()`` (``qdata``, ``scale``,
``zero``, ``scale_absmax``, ``scale_offset``), so a state_dict holds ``<layer>.qdata``, ``<layer>.scale``...
The optional bias stays a float parameter. ``forward`` goes through ``core.backends``: one dispatch point.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError
from . import backends
from .qtensor import QuantizedTensor, tensor_specs
from .scheme import QuantScheme


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W [out_features, in_features]`` stored quantized under ``scheme``.

    dtype: the dtype of the bias and the default dtype of :meth:`dequantize_weight`.
    Moving the module (``.to(device)``) moves the buffers; casting it (``.half()``, ``.to(torch.bfloat16)``)
    casts only the bias: the stored codes and scales keep their dtypes, which are part of the format.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not isinstance(scheme, QuantScheme):
            raise ConfigError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"QuantLinear {name} must be a positive integer, got {value!r}")
        if not dtype.is_floating_point:
            raise ConfigError(f"QuantLinear dtype must be a floating-point dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.dtype = dtype
        for name, tensor in QuantizedTensor.empty_tensors((out_features, in_features), scheme, device).items():
            self.register_buffer(name, tensor)
        self._weight_names = tuple(tensor_specs((out_features, in_features), scheme))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (its weight is read, never modified); same device, bias copied."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.is_meta:
            raise ConfigError("the linear's weight is on the 'meta' device (not loaded); load real weights first")
        qweight = QuantizedTensor.from_float(weight, scheme)
        layer = cls(
            linear.in_features,
            linear.out_features,
            scheme,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=torch.device("meta"),  # placeholders only; real tensors are installed below
        )
        for name, tensor in qweight.tensors().items():
            layer._buffers[name] = tensor
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    # --- the weight ----------------------------------------------------------------------------------
    @property
    def quantized_weight(self) -> QuantizedTensor:
        """A ``QuantizedTensor`` view of the buffers (no copy)."""
        tensors = {name: self._buffers[name] for name in self._weight_names}
        return QuantizedTensor((self.out_features, self.in_features), self.scheme, tensors)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` as ``dtype`` (default: the layer's dtype)."""
        return self.quantized_weight.dequantize(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight plus the bias."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.quantized_weight.nbytes + bias

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight element (codes, scales and zeros; the bias is not counted)."""
        return self.quantized_weight.bits_per_weight

    # --- nn.Module -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]`` through the selected backend."""
        if x.shape[-1] != self.in_features:
            raise ConfigError(
                f"QuantLinear expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        return backends.select_backend(self, x)(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}, "
            f"bias={self.bias is not None}"
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would cast float buffers (fp16 scales, float32 absmax) and silently
        # change the stored format. Keep each buffer's dtype, follow only its device.
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        if self.bias is not None:
            self.dtype = self.bias.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # load_state_dict would copy_() a tensor of another dtype into a buffer without complaint; a dtype
        # mismatch here means the checkpoint was written for another scheme, so say so instead.
        for name in self._weight_names:
            key = prefix + name
            if key in state_dict:
                got, want = state_dict[key], self._buffers[name]
                if got.dtype != want.dtype:
                    raise CorruptFileError(
                        f"'{key}' is {got.dtype} but a {self.scheme.label} layer stores {want.dtype}; the checkpoint "
                        "was written with another quantization scheme (check holdall_quant.json)"
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def why_not_stackable(layers) -> str | None:
    """None when :func:`stack_outputs` can join these layers; otherwise the reason."""
    layers = list(layers)
    if len(layers) < 2:
        return "fewer than two layers"
    first = layers[0]
    kinds = {type(layer) for layer in layers}
    if kinds == {nn.Linear}:
        if any(layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device
               or layer.in_features != first.in_features for layer in layers):
            return "the linears differ in input width, dtype or device"
        return None
    if kinds != {QuantLinear}:
        return f"mixed layer types {sorted(k.__name__ for k in kinds)}"
    if any(layer.scheme != first.scheme or layer.in_features != first.in_features or layer.dtype != first.dtype
           for layer in layers):
        return "the layers differ in scheme, input width or dtype"
    scheme = first.scheme
    if scheme.double_quant:
        # each layer's scales are quantized again with its own offset and nested blocks: no common layout
        return f"{scheme.label}: double-quantized scales are per layer"
    if scheme.is_codebook and first.in_features % scheme.group_size:
        return f"{scheme.label}: blocks of {scheme.group_size} straddle rows of {first.in_features}"
    total = sum(layer.out_features for layer in layers)
    joined = tensor_specs((total, first.in_features), scheme)
    for name in first._weight_names:
        own = [layer._buffers[name] for layer in layers]
        if any(t.device != own[0].device or not t.is_contiguous() for t in own):
            return f"buffer {name!r} is not contiguous or not on one device"
        rows = sum(t.shape[0] for t in own) if own[0].dim() else None
        if rows is None or (rows, *own[0].shape[1:]) != tuple(joined[name][0]):
            # per-tensor scales (one value per layer) do not line up along the output rows
            return f"buffer {name!r} does not split along the output rows"
    return None


def stack_outputs(layers) -> nn.Module:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` with a single weight; the layers' weights
    become views of it (no memory is added; the layers compute exactly what they did).

    Why: at batch 1 a projection is a short, memory-bound kernel; one launch over q/k/v (or gate/up) streams
    the same bytes with fewer programs left idle at each kernel's start and end (H200: three 4096x4096 int4
    GEMVs 22.4 µs, one 12288x4096 15.4 µs). Works for ``nn.Linear`` and for ``QuantLinear`` whose buffers
    split along the output rows (every group/channel int scheme, NF4/FP4 whose blocks divide a row; not double
    quantization, whose nested scales are per layer). Raises ``ConfigError`` with the reason otherwise.
    Keep the layers' buffers in place afterwards: replacing one (``load_state_dict`` assigns, ``.to`` copies)
    ends the sharing, and the stacked layer keeps the old values.
    """
    layers = list(layers)
    reason = why_not_stackable(layers)
    if reason is not None:
        raise ConfigError(f"cannot stack these layers: {reason}")
    first = layers[0]
    total = sum(layer.out_features for layer in layers)
    has_bias = any(layer.bias is not None for layer in layers)
    if isinstance(first, nn.Linear):
        stacked: nn.Module = nn.Linear(first.in_features, total, bias=has_bias, device="meta",
                                       dtype=first.weight.dtype)
        joined = _join_and_share([layer.weight for layer in layers], lambda i, view: _set_weight(layers[i], view))
        stacked.weight = nn.Parameter(joined, requires_grad=False)
    else:
        stacked = QuantLinear(first.in_features, total, first.scheme, bias=has_bias, dtype=first.dtype,
                              device=torch.device("meta"))
        for name in first._weight_names:
            stacked._buffers[name] = _join_and_share(
                [layer._buffers[name] for layer in layers],
                lambda i, view, name=name: layers[i]._buffers.__setitem__(name, view))
    if has_bias:
        ref = next(layer.bias for layer in layers if layer.bias is not None)
        parts = [layer.bias.detach().to(ref.dtype) if layer.bias is not None
                 else torch.zeros(layer.out_features, dtype=ref.dtype, device=ref.device) for layer in layers]
        stacked.bias = nn.Parameter(torch.cat(parts), requires_grad=False)
    return stacked


def _set_weight(layer: nn.Linear, view: torch.Tensor) -> None:
    layer.weight.data = view


def _join_and_share(parts: list[torch.Tensor], install) -> torch.Tensor:
    """``cat(parts)`` along dim 0; ``install(i, view)`` then gives part ``i`` its rows of the result back as a view.

    Parts that already lie back to back in one storage (stacked before, e.g. by an earlier decoder) are joined
    by a view of it: no copy, so stacking again never holds two copies of the weights at once.
    """
    joined = _adjacent_view([p.detach() for p in parts])
    if joined is None:
        joined = torch.cat([p.detach() for p in parts])
    start = 0
    for i, part in enumerate(parts):
        install(i, joined[start:start + part.shape[0]])
        start += part.shape[0]
    return joined


def _adjacent_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the parts form when they are consecutive contiguous runs of one storage, else None."""
    first = parts[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for part in parts:
        if (part.untyped_storage().data_ptr() != storage.data_ptr() or part.storage_offset() != offset
                or not part.is_contiguous() or part.dtype != first.dtype):
            return None
        offset += part.numel()
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), shape, torch.empty(shape, device="meta").stride())
