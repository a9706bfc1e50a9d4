"""Float32 products of half-precision activations on a GPU's tensor cores (GPTQ's Hessian, AWQ's losses).

``torch.mm(a, b, out_dtype=torch.float32)`` multiplies bf16/fp16 inputs with float32 accumulation and a float32
result. A product of two bf16 (8-bit significand) or fp16 (11-bit) numbers is exact in float32, so ``xᵀx`` of
half-precision activations taken this way is the float32 ``xᵀx`` of the upcast inputs up to summation order, at
the tensor cores' rate instead of the CUDA cores' (~50 TFLOP/s on an H200). Needs a torch whose CUDA ``mm`` takes
``out_dtype``; where it does not, every function here says so (``None`` / ``False``) and callers take float32.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` on ``device`` with a float32 result: probed once on 2x2 inputs, so
    an error here can only mean the feature is missing (real inputs' errors are never mistaken for it)."""
    one = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype keyword / no kernel for it
        return False
    return True


def half_mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` in float32 from half-precision CUDA ``a``, ``b`` (same dtype); None where unsupported."""
    if not (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype):
        return None
    if not _supported(a.device, a.dtype):
        return None
    return torch.mm(a, b, out_dtype=torch.float32)


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total [in, in] += xᵀx`` for ``x [tokens, in]``; float32 ``total`` whatever ``x``'s dtype."""
    product = half_mm_float32(x.T, x)
    if product is None:
        x = x.float()
        total.addmm_(x.T, x)
    else:
        total.add_(product)
