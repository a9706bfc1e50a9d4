"""Triton kernel: LoRA dropout whose mask is a pure function of (seed, element index), with the seed read from device
memory.

Why: the fused QLoRA step needs the *same* dropout mask three times (the forward, the checkpoint's recompute, and
backward) without storing it, and inside CUDA graphs, where a seed passed as a host integer would be frozen into
the graph. Here the seed lives in a device tensor that the step rewrites before replaying its graphs, and
``tl.rand(seed + offset, index)`` (Philox) regenerates the mask anywhere. One kernel replaces five torch ops
(generator seeding, ``bernoulli_``, scaling, multiply, and in backward the masked add).

``out = where(u >= p, x / (1 - p), 0) (+ add)`` with ``u = rand(seed, i)``, ``i`` the element index of the
contiguous ``x`` (below 2**31 elements per call). The plain-torch twin (``training.fast_step._dropout_mask``) draws
its masks from a seeded ``torch.Generator`` instead: CPU and CUDA masks differ, each is reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _dropout_kernel(x_ptr, add_ptr, out_ptr, seed_ptr, seed_add, n, p, scale, ACCUMULATE: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    seed = tl.load(seed_ptr) + seed_add
    keep = tl.rand(seed, offs) >= p
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    if ACCUMULATE:
        y += tl.load(add_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor, seed_add: int, add: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``dropout(x)`` (``+ add`` when given) into ``out`` (default: a new tensor like ``x``); all contiguous."""
    n = x.numel()
    if n >= 2**31:
        raise ValueError(f"the dropout kernel indexes elements with int32: {n} elements is too many for one call")
    out = torch.empty_like(x) if out is None else out
    grid = (triton.cdiv(n, BLOCK),)
    _dropout_kernel[grid](x, add if add is not None else x, out, seed, seed_add, n, p, 1.0 / (1.0 - p),
                          ACCUMULATE=add is not None, BLOCK=BLOCK)
    return out
