"""Triton kernel: a 4-bit packed weight decoded to bf16/fp16 ``[out, in]`` in one pass (the training path's dequantize).

Why a kernel: QLoRA's step dequantizes every base weight three times (forward, the checkpoint's recompute, and
the input gradient in backward). The plain-torch path (``core.backends.dequantize_for_compute``) writes float32
values, multiplies them by the block scales in place and casts them: ~10 bytes of memory traffic per weight.
This kernel reads the half byte, the scale (double-quant decoded on the fly) and writes 2 bytes: ~2.5 bytes per
weight, so a 7B model's three dequantizations per step cost ~16 ms of an H100's bandwidth instead of ~65.

One program decodes ``BLOCK`` packed bytes (``2 * BLOCK`` weights) of one contiguous run: byte ``j`` of the
flattened ``[out, in/2]`` code tensor holds weights ``2j`` (high nibble) and ``2j + 1`` (low nibble), and the
output is written in the same flat order; ``row0`` decodes a range of rows only (the training step's input
gradient multiplies a large weight a row block at a time, so only that block's floats exist at once). The
arithmetic is the reference's: the float32 value times the float32 scale, rounded once to the output dtype; the
plain-torch twin is ``kernels.packed.reference_decode`` and ``tests/test_fast_step.py`` compares the two on the
device.

Imports Triton at the top: only ``kernels.dequant`` imports this module, at the first CUDA launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import Operands, Plan

BLOCK = 1024  # bytes per program: 2048 weights


@triton.jit
def _dequant_kernel(codes_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, out_ptr, n_bytes, half_in, row0,
                    GROUP: tl.constexpr, GROUP_STEP: tl.constexpr, SCALE_ROW_STRIDE: tl.constexpr,
                    ZERO_ROW_STRIDE: tl.constexpr, KIND: tl.constexpr, SCALE_DQ: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte index into rows row0.. of the [out, in/2] codes
    mask = offs < n_bytes
    g = offs + row0 * half_in  # byte index into the layer's whole [out, in/2] codes
    byte = tl.load(codes_ptr + g, mask=mask, other=0).to(tl.int32)
    row = g // half_in  # the layer's row: scales, zeros and absmax blocks are indexed by it
    k0 = (g - row * half_in) * 2  # input index of the high nibble (even); k0 + 1 is in the same group
    group = k0 // GROUP
    index = row * SCALE_ROW_STRIDE + group * GROUP_STEP
    if SCALE_DQ:  # double quant: the scale is a uint8 code of the signed dynamic map, per 256 scales an absmax
        code = tl.load(s_ptr + index, mask=mask, other=0).to(tl.int32)
        scale = tl.load(dmap_ptr + code, mask=mask, other=0.0) * tl.load(sabs_ptr + index // 256, mask=mask,
                                                                          other=0.0)
        scale = scale + tl.load(soff_ptr)
    else:
        scale = tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)
    hi = byte >> 4
    lo = byte & 15
    if KIND == 2:  # codebook (nf4/fp4): a 16-entry float32 table
        v_hi = tl.load(val_ptr + hi, mask=mask, other=0.0)
        v_lo = tl.load(val_ptr + lo, mask=mask, other=0.0)
    else:
        if KIND == 1:  # asymmetric int: 4-bit zeros packed two per byte along the groups, even group high
            zgroup = group * GROUP_STEP
            zbyte = tl.load(z_ptr + row * ZERO_ROW_STRIDE + zgroup // 2, mask=mask, other=0).to(tl.int32)
            zero = (zbyte >> (4 * (1 - zgroup % 2))) & 15
        else:
            zero = 8
        v_hi = (hi - zero).to(tl.float32)
        v_lo = (lo - zero).to(tl.float32)
    pair = tl.interleave(v_hi * scale, v_lo * scale)  # [2 * BLOCK] in output order
    out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


def dequantize(ops: Operands, p: Plan, out: torch.Tensor, row0: int = 0, rows: int | None = None) -> torch.Tensor:
    """Write rows ``row0 .. row0 + rows`` (default: all) of the layer's weight into ``out`` (contiguous
    ``[rows, in_features]`` bf16/fp16) and return it."""
    rows = p.out_features - row0 if rows is None else rows
    n_bytes = rows * p.in_features // 2
    grid = (triton.cdiv(n_bytes, BLOCK),)
    _dequant_kernel[grid](
        ops.codes, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.values, out,
        n_bytes, p.in_features // 2, row0,
        GROUP=p.group, GROUP_STEP=p.group_step, SCALE_ROW_STRIDE=p.scale_row_stride,
        ZERO_ROW_STRIDE=p.zero_row_stride, KIND=p.kind, SCALE_DQ=p.double_quant, BLOCK=BLOCK,
    )
    return out
