"""The one matmul dispatch point for quantized layers.

``QuantLinear.forward(x)`` is ``select_backend(layer, x)(layer, x)``. A faster path (a GPU kernel, an
int8 matmul, a LoRA wrapper) registers itself here with a ``supports(layer, x) -> bool`` predicate and a
priority; callers never change. The plain-torch reference backend (dequantize to ``x.dtype``, then
``F.linear``) supports everything, on every device, and is always the last resort.

Training through a frozen quantized base (QLoRA): when autograd needs a gradient through the layer (the
input or the bias requires grad), the reference backend runs :class:`DequantLinearFunction`, which
dequantizes in forward, lets the float weight go, and dequantizes *again* in backward to compute
``grad_input = grad_out @ W``. Plain ``F.linear`` on a dequantized weight would make autograd keep that
float weight alive until backward, i.e. a full-precision copy of the whole model in the activations.

Backends that need heavy imports (the Triton kernels in ``holdall.kernels``) live above the core; the core
names them only by module in :data:`DEVICE_PLUGINS` and imports them on the first forward on that device type.

Dequantization itself (:func:`dequantize_for_compute`) has fast, vectorised paths for the formats training
uses (NF4/FP4 with or without double quantization, 4-bit int), bit-identical to ``QuantizedTensor.dequantize``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .codebooks import codebook
from .packing import unpack

ForwardFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
SupportsFn = Callable[[torch.nn.Module, torch.Tensor], bool]

REFERENCE = "reference"
_REFERENCE_PRIORITY = float("-inf")


@dataclass(frozen=True)
class Backend:
    """A registered forward implementation."""

    name: str
    fn: ForwardFn
    supports: SupportsFn
    priority: float
    order: int  # registration order: among equal priorities, the later registration wins


_registry: dict[str, Backend] = {}
_counter = 0
_forced: list[str] = []

#: Backend packages that live *above* the core (they need heavy imports such as Triton), named per device
#: type. The first time a layer runs on that device type, the package is imported and its ``enable()`` called;
#: it registers itself through :func:`register_backend` like any other backend. The core only knows the
#: module's name (no import, no use of its names), so ``import holdall`` stays light, CPU-only programs never
#: load it, and no caller has to remember a setup call. ``HOLDALL_KERNELS=0`` in the environment skips them.
DEVICE_PLUGINS: dict[str, tuple[str, ...]] = {"cuda": ("holdall.kernels",)}
_plugins_pending: set[str] = set(DEVICE_PLUGINS)
#: module -> why it could not be loaded (an optional dependency missing); the reference path runs instead.
plugin_errors: dict[str, str] = {}


def _always(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    return True


def register_backend(
    name: str, fn: ForwardFn, supports: SupportsFn | None = None, priority: float = 0, *, replace: bool = False
) -> None:
    """Register ``fn(layer, x) -> y`` under ``name``.

    supports: ``(layer, x) -> bool``; None means "everything". The highest-priority backend whose
    ``supports`` answers True runs. replace: allow re-registering an existing name (else an error).
    """
    global _counter
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a backend needs a non-empty string name, got {name!r}")
    if name == REFERENCE and name in _registry and not replace:
        raise ConfigError("the 'reference' backend is built in; register yours under another name")
    if name in _registry and not replace:
        raise ConfigError(f"a backend named {name!r} is already registered; pass replace=True to override it")
    if not callable(fn):
        raise ConfigError(f"backend {name!r}: fn must be callable (layer, x) -> tensor")
    if supports is not None and not callable(supports):
        raise ConfigError(f"backend {name!r}: supports must be callable (layer, x) -> bool, or None")
    if not isinstance(priority, (int, float)) or isinstance(priority, bool):
        raise ConfigError(f"backend {name!r}: priority must be a number, got {priority!r}")
    _counter += 1
    _registry[name] = Backend(name, fn, supports or _always, float(priority), _counter)


def unregister_backend(name: str) -> None:
    """Remove a backend (the reference backend cannot be removed)."""
    if name == REFERENCE:
        raise ConfigError("the 'reference' backend cannot be removed: it is the fallback for every layer")
    if name not in _registry:
        raise ConfigError(f"no backend named {name!r}; registered: {available_backends()}")
    del _registry[name]


def available_backends() -> list[str]:
    """Registered backend names, in the order they are tried."""
    return [b.name for b in _ordered()]


def select_backend(layer: torch.nn.Module, x: torch.Tensor) -> ForwardFn:
    """The forward function for this layer and input: the best registered backend that supports them."""
    if _plugins_pending and x.device.type in _plugins_pending:
        _load_plugins(x.device.type)
    if _forced:
        return _registry[_forced[-1]].fn
    for backend in _ordered():
        if backend.supports(layer, x):
            return backend.fn
    return reference_forward  # unreachable: the reference backend supports everything


def _load_plugins(device_type: str) -> None:
    """Import the backend packages for ``device_type`` once (see :data:`DEVICE_PLUGINS`)."""
    _plugins_pending.discard(device_type)  # first, so a failing import is tried once, not on every forward
    if os.environ.get("HOLDALL_KERNELS", "1").strip() == "0":
        return
    for module in DEVICE_PLUGINS[device_type]:
        try:
            importlib.import_module(module).enable()
        except ImportError as exc:  # an optional accelerator dependency is missing: the reference path serves
            plugin_errors[module] = f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend inside a ``with`` block (for tests and benchmarks), whatever it claims to support."""
    if name not in _registry:
        raise ConfigError(f"no backend named {name!r}; registered: {available_backends()}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def reference_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize the weight to the compute dtype on ``x``'s device and call ``F.linear``; x is ``[..., in]``.

    The compute dtype is ``x.dtype``, or the autocast dtype when autocast is on for ``x``'s device (the
    weight is then dequantized straight into it instead of via a float32 copy that autocast would cast).
    """
    if not torch.is_floating_point(x):
        raise ConfigError(f"QuantLinear needs a floating-point input, got {x.dtype}")
    dtype = compute_dtype(x)
    x = x.to(dtype)
    bias = layer.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return DequantLinearFunction.apply(x, bias, layer)
    weight = dequantize_for_compute(layer, dtype)  # [out, in]
    return F.linear(x, weight, bias.to(dtype) if bias is not None else None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's dtype when autocast is on for its device, else x's."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class DequantLinearFunction(torch.autograd.Function):
    """``y = x @ dequant(W)^T + b`` for a frozen quantized ``W``; saves no tensor for backward.

    forward: dequantize -> ``F.linear``; the float weight is a temporary freed on return.
    backward: dequantize again -> ``grad_input = grad_out @ W``; the packed weight gets no gradient (it is
    frozen by construction), the bias gets ``sum(grad_out)`` when it requires grad.
    Re-dequantizing costs a few percent of the matmul (see :func:`dequantize_for_compute`) and saves
    ``4 * out * in`` bytes per layer of activation memory. Works under gradient checkpointing (reentrant or
    not: nothing is saved, so there is nothing to recompute) and under autocast (the caller passes ``x``
    already in the compute dtype; backward runs with autocast off, in that same dtype).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: torch.nn.Module) -> torch.Tensor:
        ctx.layer = layer  # the module, not a tensor: its packed buffers are what backward dequantizes
        ctx.has_bias = bias is not None
        weight = dequantize_for_compute(layer, x.dtype)  # [out, in], dropped when forward returns
        return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_input = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                weight = dequantize_for_compute(ctx.layer, grad_out.dtype)  # [out, in]
                grad_input = grad_out @ weight  # [..., out] @ [out, in] -> [..., in]
            if ctx.has_bias and ctx.needs_input_grad[1]:
                grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.layer.bias.dtype)  # [out]
        return grad_input, grad_bias, None


# --- fast dequantization --------------------------------------------------------------------------------
def dequantize_for_compute(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's float weight ``[out, in]`` as ``dtype``, bit-identical to ``layer.dequantize_weight(dtype)``.

    Fast paths: codebook (nf4/fp4) weights whose element count is a whole number of even-sized blocks, and
    4-bit int weights with an even ``in_features``. Anything else takes the general path.
    """
    scheme = layer.scheme
    if scheme.is_codebook:
        numel = layer.out_features * layer.in_features
        if numel % scheme.group_size == 0 and scheme.group_size % 2 == 0:
            return _dequantize_codebook4(layer, dtype)
    elif scheme.bits == 4 and layer.in_features % 2 == 0:
        return _dequantize_int4(layer, dtype)
    return layer.dequantize_weight(dtype)


def _dequantize_codebook4(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """NF4/FP4: one gather of value *pairs* per packed byte, then one in-place multiply by the block absmax.

    A byte holds two codes (even index in the high nibble), so a 256-entry table of ``(table[hi], table[lo])``
    decodes a whole byte with one lookup: no nibble shifts, no int64 codes, no [numel] code temporary.
    """
    scheme = layer.scheme
    out_features, in_features = layer.out_features, layer.in_features
    qdata = layer.qdata.reshape(-1)  # [numel / 2] uint8
    absmax = layer.quantized_weight.scales()  # [numel / block] float32 (double quant decoded: small)
    values = torch.empty(out_features * in_features, dtype=torch.float32, device=qdata.device)  # [numel]
    torch.index_select(_pair_table(scheme.dtype, qdata.device), 0, qdata.int(), out=values.view(-1, 2))
    values.view(-1, scheme.group_size).mul_(absmax[:, None])  # [n_blocks, block] *= [n_blocks, 1]
    return _as_dtype(values.view(out_features, in_features), dtype)


def _dequantize_int4(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """4-bit int: decode byte pairs to ``q - midpoint`` (or raw ``q``), then subtract zeros / scale per group."""
    scheme = layer.scheme
    out_features, in_features = layer.out_features, layer.in_features
    qdata = layer.qdata  # [out, in / 2] uint8 (row-wise MSB-first: even index in the high nibble)
    values = torch.empty(out_features, in_features, dtype=torch.float32, device=qdata.device)  # [out, in]
    table = _pair_table("int4_sym" if scheme.symmetric else "int4_raw", qdata.device)
    torch.index_select(table, 0, qdata.reshape(-1).int(), out=values.view(-1, 2))
    scale = layer.quantized_weight.scales()  # [R, G] float32
    if scheme.symmetric:
        _apply_groups(values, scale, scheme.group_size, torch.Tensor.mul_)
    else:
        zero = unpack(layer.zero, 4, scale.shape[1]).float()  # [R, G]; small, the general unpack is fine
        _apply_groups(values, zero, scheme.group_size, torch.Tensor.sub_)
        _apply_groups(values, scale, scheme.group_size, torch.Tensor.mul_)
    return _as_dtype(values, dtype)


def _apply_groups(values: torch.Tensor, per_group: torch.Tensor, group_size: int, op) -> None:
    """In place: ``op(values[:, group], per_group[:, g])`` for every group along the input dim.

    values ``[out, in]``; per_group ``[R, G]`` with R in {1, out} and G in {1, ceil(in / group_size)}.
    The last group may be partial (SmolLM2: 576 = 4 x 128 + 64), handled as one extra slice, not a
    repeat_interleave of the scales to ``[out, in]``.
    """
    out_features, in_features = values.shape
    if per_group.shape[1] == 1:  # channel / tensor granularity
        op(values, per_group)
        return
    n_full = in_features // group_size
    full = n_full * group_size
    if n_full:
        op(values[:, :full].view(out_features, n_full, group_size), per_group[:, :n_full, None])
    if full < in_features:
        op(values[:, full:], per_group[:, n_full:])


def _as_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # float32 math first, then one cast: the same rounding as QuantizedTensor.dequantize(dtype)
    return values if dtype == torch.float32 else values.to(dtype)


_PAIR_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _pair_table(kind: str, device: torch.device) -> torch.Tensor:
    """float32 ``[256, 2]``: for a packed byte ``b``, the values of its high and low nibble codes.

    kind: "nf4"/"fp4" (codebook values), "int4_sym" (``code - 8``), "int4_raw" (``code``).
    """
    key = (kind, str(device))
    table = _PAIR_TABLES.get(key)
    if table is None:
        if kind in ("nf4", "fp4"):
            per_code = codebook(kind, "cpu")  # [16]
        else:
            per_code = torch.arange(16, dtype=torch.float32) - (8.0 if kind == "int4_sym" else 0.0)
        high = per_code.repeat_interleave(16)  # byte b -> code b >> 4
        low = per_code.repeat(16)  # byte b -> code b & 15
        table = torch.stack([high, low], dim=1).to(device)  # [256, 2]
        _PAIR_TABLES[key] = table
    return table


def _ordered() -> list[Backend]:
    return sorted(_registry.values(), key=lambda b: (-b.priority, -b.order))


register_backend(REFERENCE, reference_forward, None, priority=_REFERENCE_PRIORITY)
