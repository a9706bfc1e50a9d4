"""Triton kernel that pulls byte ranges of global memory into the GPU's L2 cache (Hopper's bulk prefetch).

The static decoder runs it on a side stream while a layer's attention runs: attention is latency-bound and
leaves most of the memory bandwidth idle, so the next projections' packed weights can be on their way to L2 in
the meantime (each byte is still read from HBM once per token: the roofline's accounting is unchanged; the
GEMVs then find those bytes in L2). A prefetch changes no value anywhere, so the CPU path is "do nothing".

Imported on first use, like :mod:`holdall.kernels.triton_wq4`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import ptx

CHUNK = 4096  # bytes per prefetch instruction
BLOCK = 128  # chunks per program (one per thread at 4 warps)
MAX_RANGES = 4
_ASM_PREFETCH = tl.constexpr(ptx.prefetch_l2_asm())


@triton.jit
def _prefetch_kernel(p0, n0, p1, n1, p2, n2, p3, n3, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``(i, r)`` prefetches chunks ``i * BLOCK ..`` of range ``r`` (``n_r`` bytes from byte pointer ``p_r``)."""
    r = tl.program_id(1)
    ptr, n = p0, n0
    if r == 1:
        ptr, n = p1, n1
    elif r == 2:
        ptr, n = p2, n2
    elif r == 3:
        ptr, n = p3, n3
    off = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.minimum(n - off, CHUNK).to(tl.int32)  # <= 0 past the end: no prefetch
    tl.inline_asm_elementwise(_ASM_PREFETCH, "=r,l,r", [ptr + off, size], tl.int32, False, 1)


def prefetch_l2(ranges: list[tuple[torch.Tensor, int]]) -> None:
    """Prefetch the first ``n`` bytes of each CUDA tensor ``t`` in ``ranges = [(t, n), ...]`` (at most 4; ``n``
    is rounded down to whole 16-byte units; each tensor 16-byte aligned) into L2, in one launch on the current
    stream."""
    if not ranges:
        return
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"prefetch_l2 takes at most {MAX_RANGES} ranges per launch, got {len(ranges)}")
    args = []
    for tensor, n in ranges:
        if not tensor.is_cuda or tensor.data_ptr() % 16:
            raise ValueError("prefetch_l2 needs 16-byte aligned CUDA tensors")
        n = min(int(n), tensor.numel() * tensor.element_size()) // 16 * 16
        args += [tensor.view(torch.uint8) if tensor.is_contiguous() else tensor, n]
    while len(args) < 2 * MAX_RANGES:
        args += [args[0], 0]
    longest = max(n for _, n in zip(args[::2], args[1::2]))
    grid = (max(1, triton.cdiv(triton.cdiv(longest, CHUNK), BLOCK)), len(ranges))
    _prefetch_kernel[grid](*args, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
