"""The one matmul dispatch point for quantized layers.

``QuantLinear.forward(x)`` is ``select_backend(layer, x)(layer, x)``. A faster path (a GPU kernel, an
int8 matmul, a LoRA wrapper) registers itself here with a ``supports(layer, x) -> bool`` predicate and a
priority; callers never change. The plain-torch reference backend (dequantize to ``x.dtype``, then
``F.linear``) supports everything, on every device, and is always the last resort.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError

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
    if _forced:
        return _registry[_forced[-1]].fn
    for backend in _ordered():
        if backend.supports(layer, x):
            return backend.fn
    return reference_forward  # unreachable: the reference backend supports everything


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
    """Dequantize the weight to ``x.dtype`` on ``x``'s device and call ``F.linear``; x is ``[..., in]``."""
    if not torch.is_floating_point(x):
        raise ConfigError(f"QuantLinear needs a floating-point input, got {x.dtype}")
    weight = layer.dequantize_weight(x.dtype)  # [out, in]
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, weight, bias)


def _ordered() -> list[Backend]:
    return sorted(_registry.values(), key=lambda b: (-b.priority, -b.order))


register_backend(REFERENCE, reference_forward, None, priority=_REFERENCE_PRIORITY)
