"""Triton kernels for ``y = x @ W^T (+ b)`` with a 4-bit packed ``W``, read in place (no dequantized copy).

Two kernels, one per regime, each checked against :func:`holdall.kernels.packed.reference_linear` (the
plain-torch decode + float32 matmul beside them) by ``tests/test_kernels.py``:

* :func:`gemv` (one input row, decode): bandwidth-bound in principle. Each program streams ``BLOCK_N`` weight
  rows as int32 words (8 codes), tiled ``[rows, groups, words per group]`` so a group's scale/zero is loaded
  once per thread and applied once per word, never per code. Int codes become floats without a conversion
  instruction: ``nibble | 0x4B000000`` is the float ``2**23 + nibble``, so one subtraction of ``2**23 + zero``
  yields ``code - zero`` exactly (I2F runs at a quarter of the FMA rate on Hopper). ``x`` is read as int32
  pairs (a bf16 pair becomes two floats by two bit operations). Codebook (NF4/FP4) codes take the
  ``_gemv4d_kernel`` variant (``[rows, groups, words, 8 codes]`` tiles, one vector load of a word's 8
  activations) and a 16-entry table (``LUT16``; all lanes of a warp hit one 64-byte line). ``STAGES``
  software-pipelines the weight loads, ``PREFETCH`` double-buffers them in registers.
* :func:`gemm` (2..64 rows): tensor cores. Per iteration one group of codes per weight row; the codes are
  split into the even (high nibble) and odd (low nibble) input positions, multiplied against the matching
  even/odd columns of ``x`` (two ``tl.dot``s, no interleaving shuffle), and the group scale is applied to the
  float32 partial sum. Int codes enter the dot as the exact small integers ``code - zero`` (exact in
  bf16/fp16), so the only rounding is the activations' own; codebook values (byte-pair or 16-entry table)
  enter in the activation dtype. Split-K (float32 partials summed in a fixed order by ``_splitk_sum``, so
  results are deterministic) keeps all SMs busy.

Where these stand (H200, BENCHMARKS.md "GPU: 4-bit kernels (issue 6)"): GEMV 1.3-1.4x bf16 cuBLAS for int4 and
about 1.0x for NF4, i.e. ~28% of copy bandwidth: latency/instruction-bound, not yet bandwidth-bound; GEMM below
bf16 cuBLAS at 4..64 rows (int4 0.5-0.75x, NF4 0.1-0.27x).

This module imports Triton at the top: import it only when a CUDA launch is about to happen
(``holdall.kernels.dispatch`` does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .packed import CODES_PER_WORD, Operands, Plan

_MAGIC = tl.constexpr(8388608.0)  # 2**23: the float whose low mantissa bits are an OR-ed-in integer


@triton.jit
def _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, index, mask, SCALE_DQ: tl.constexpr):
    """float32 scales at flattened ``index``; double-quantized ones as ``map[code] * absmax[idx // 256] + offset``."""
    if SCALE_DQ:
        code = tl.load(s_ptr + index, mask=mask, other=0).to(tl.int32)
        nested = tl.load(sabs_ptr + index // 256, mask=mask, other=0.0)
        return tl.load(dmap_ptr + code) * nested + tl.load(soff_ptr)
    else:
        return tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_zero(z_ptr, row, group, zero_row_stride, mask):
    """Asymmetric zero point (int32) of (row, group): 4-bit codes packed two per byte, even group high."""
    packed = tl.load(z_ptr + row * zero_row_stride + group // 2, mask=mask, other=0).to(tl.int32)
    return (packed >> (4 * (1 - group % 2))) & 0xF


@triton.jit
def _unpack_pair(pair, X_BF16: tl.constexpr):
    """Two 16-bit floats packed in an int32 (first in the low half) -> two float32s."""
    if X_BF16:  # bf16 is the top half of a float32: shifting it into place is the conversion
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, pair_ptr, b_ptr, y_ptr,
    N, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
    GROUP_W: tl.constexpr,  # int32 words per group (group / 8)
    KIND: tl.constexpr,  # 0 int sym, 1 int asym, 2 codebook
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per program
    BLOCK_G: tl.constexpr,  # groups per loop iteration
    X_BF16: tl.constexpr,  # x is bf16 (else fp16); x_ptr points at it as int32 pairs
    STAGES: tl.constexpr = 1,  # software pipelining depth of the weight loads (bytes in flight)
    PREFETCH: tl.constexpr = False,  # load the next tile's words before decoding this one (registers)
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = rn[:, None, None]  # [BN, 1, 1]
    n_ok = n3 < N
    rg = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1]
    rj = tl.arange(0, GROUP_W)[None, None, :]  # [1, 1, GW]
    w_rows = w_ptr + n3 * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_G, GROUP_W], dtype=tl.float32)
    if PREFETCH:
        first = rg * GROUP_W + rj
        w_next = tl.load(w_rows + first, mask=n_ok & (first < KW), other=0)
    for g0 in tl.range(0, n_groups, BLOCK_G, num_stages=STAGES):
        g3 = g0 + rg
        kw3 = g3 * GROUP_W + rj  # [1, BG, GW] word index along the row
        k_ok = kw3 < KW
        if PREFETCH:  # the next tile's DRAM latency overlaps this tile's decode
            w = w_next
            after = kw3 + BLOCK_G * GROUP_W
            w_next = tl.load(w_rows + after, mask=n_ok & (after < KW), other=0)
        else:
            w = tl.load(w_rows + kw3, mask=n_ok & k_ok, other=0)  # [BN, BG, GW] int32
        gs = g3 * group_step
        s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, n3 * scale_row_stride + gs, n_ok & (g3 < n_groups),
                         SCALE_DQ)  # [BN, BG, 1]
        # x is read as int32 pairs (x[8w + 2j], x[8w + 2j + 1]): half the load instructions of one per value,
        # and a byte of codes meets exactly one pair. Loads of x are the kernel's main L1 traffic.
        x_word = x_ptr + kw3 * 4
        part = tl.zeros([BLOCK_N, BLOCK_G, GROUP_W], dtype=tl.float32)
        if KIND == 1:
            zero = _group_zero(z_ptr, n3, gs, zero_row_stride, n_ok & (g3 < n_groups))
            bias_f = _MAGIC + zero.to(tl.float32)  # [BN, BG, 1]
        else:
            bias_f = _MAGIC + 8.0
        for j in tl.static_range(4):  # byte j of the word: codes 8w + 2j (high nibble) and 8w + 2j + 1 (low)
            x_even, x_odd = _unpack_pair(tl.load(x_word + j, mask=k_ok, other=0), X_BF16)
            if KIND == 2:
                pair = tl.load(pair_ptr + ((w >> (8 * j)) & 0xFF))  # int64: low half = high-nibble value
                w_even = pair.to(tl.int32).to(tl.float32, bitcast=True)
                w_odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            else:
                w_even = (((w >> (8 * j + 4)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - bias_f
                w_odd = (((w >> (8 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - bias_f
            part += w_even * x_even + w_odd * x_odd
        acc += part * s
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemv4d_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, pair_ptr, val_ptr, b_ptr, y_ptr,
    N, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
    GROUP_W: tl.constexpr,  # int32 words per group (group / 8)
    KIND: tl.constexpr,  # 0 int sym, 1 int asym, 2 codebook
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per program
    BLOCK_G: tl.constexpr,  # groups per loop iteration
    STAGES: tl.constexpr = 1,
    LUT16: tl.constexpr = False,  # codebook: look codes up in the 16-value table (one 64-byte line) per code
):
    """Variant of :func:`_gemv_kernel` over ``[rows, groups, words, 8 codes]`` tiles: one vector load of a word's
    8 activations instead of 4 pair loads, and Triton keeps several rows per thread, so each activation serves
    them all. The codebook default (with ``LUT16``: 1.4x faster than the pairs kernel for NF4 on an H200); for
    int codes the pairs kernel is faster. Keep ``STAGES=1`` with codebooks: pipelining turns the table lookups
    into asynchronous copies (15x slower)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n4 = rn[:, None, None, None]  # [BN, 1, 1, 1]
    n_ok = n4 < N
    rg = tl.arange(0, BLOCK_G)[None, :, None, None]  # [1, BG, 1, 1]
    rj = tl.arange(0, GROUP_W)[None, None, :, None]  # [1, 1, GW, 1]
    rc = tl.arange(0, 8)[None, None, None, :]  # [1, 1, 1, 8]: code c of a word
    acc = tl.zeros([BLOCK_N, BLOCK_G, GROUP_W, 8], dtype=tl.float32)
    for g0 in tl.range(0, n_groups, BLOCK_G, num_stages=STAGES):
        g4 = g0 + rg
        kw4 = g4 * GROUP_W + rj  # [1, BG, GW, 1] word index along the row
        k_ok = kw4 < KW
        w = tl.load(w_ptr + n4 * stride_wn + kw4, mask=n_ok & k_ok, other=0)  # [BN, BG, GW, 1] int32
        gs = g4 * group_step
        s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, n4 * scale_row_stride + gs, n_ok & (g4 < n_groups),
                         SCALE_DQ)  # [BN, BG, 1, 1]
        # The 8 activations of a word are 16 contiguous bytes: one vector load per word.
        xv = tl.load(x_ptr + kw4 * 8 + rc, mask=k_ok, other=0.0).to(tl.float32)  # [1, BG, GW, 8]
        if KIND == 2:
            # code c sits in byte c // 2, high nibble for even c: table index = byte, value = half c % 2
            if LUT16:
                wv = tl.load(val_ptr + ((w >> (4 * (rc ^ 1))) & 0xF))
            else:
                byte = (w >> (8 * (rc // 2))) & 0xFF
                pair = tl.load(pair_ptr + byte)  # int64 [BN, BG, GW, 8]: low half = high-nibble value
                half = tl.where(rc % 2 == 0, pair, pair >> 32)
                wv = half.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            if KIND == 1:
                zero = _group_zero(z_ptr, n4, gs, zero_row_stride, n_ok & (g4 < n_groups))
                bias_f = _MAGIC + zero.to(tl.float32)  # [BN, BG, 1, 1]
            else:
                bias_f = _MAGIC + 8.0
            q = (((w >> (4 * (rc ^ 1))) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # code c at bit 4(c^1)
            wv = q - bias_f  # code - zero, exact
        acc += (wv * xv) * s
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, pair_ptr, val_ptr, b_ptr, y_ptr,
    M, N, K, n_iters, stride_xm, stride_ym, stride_wn, scale_row_stride, group_step, zero_row_stride,
    iters_per_split,
    GROUP: tl.constexpr,  # codes per group = codes per iteration
    KIND: tl.constexpr,
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: write float32 partials [SPLIT_K, M, N] to y_ptr for _splitk_sum
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LUT16: tl.constexpr = False,  # codebook: 16-value table per code instead of the byte-pair table
):
    HALF: tl.constexpr = GROUP // 2  # bytes of one group in a weight row
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    dtype = x_ptr.dtype.element_ty
    start = pid_k * iters_per_split
    stop = tl.minimum(start + iters_per_split, n_iters)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + rn[None, :] * stride_wn  # [1, BN]
    x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
    for it in range(start, stop):
        kb = it * HALF + rb  # byte index along a weight row
        kb_ok = kb < K // 2
        wb = tl.load(w_rows + kb[:, None], mask=kb_ok[:, None] & n_ok[None, :], other=0)  # [HALF, BN] uint8
        g = it * group_step
        s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, rn * scale_row_stride + g, n_ok, SCALE_DQ)  # [BN]
        if KIND == 2:
            if LUT16:  # every lane reads the same 64-byte line: one L1 wavefront per load
                w_even = tl.load(val_ptr + (wb >> 4).to(tl.int32)).to(dtype)
                w_odd = tl.load(val_ptr + (wb & 0xF).to(tl.int32)).to(dtype)
            else:  # one 8-byte table load decodes both codes of a byte
                pair = tl.load(pair_ptr + wb.to(tl.int32))  # int64 [HALF, BN]: low half = high-nibble value
                w_even = pair.to(tl.int32).to(tl.float32, bitcast=True).to(dtype)
                w_odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True).to(dtype)
        else:
            hi = (wb >> 4).to(tl.int32)  # code of input 2*kb
            lo = (wb & 0xF).to(tl.int32)  # code of input 2*kb + 1
            if KIND == 1:
                zero = _group_zero(z_ptr, rn, g, zero_row_stride, n_ok)[None, :]
            else:
                zero = 8
            w_even = (hi - zero).to(dtype)  # small integers: exact in bf16/fp16
            w_odd = (lo - zero).to(dtype)
        x_ok = m_ok[:, None] & kb_ok[None, :]
        x_even = tl.load(x_rows + 2 * kb[None, :], mask=x_ok, other=0.0)  # [BM, HALF]
        x_odd = tl.load(x_rows + 2 * kb[None, :] + 1, mask=x_ok, other=0.0)
        part = tl.dot(x_even, w_even)
        part = tl.dot(x_odd, w_odd, part)
        acc += part * s[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(y_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=out_ok)


@triton.jit
def _splitk_sum(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y = sum_k partials[k] (+ bias)`` in a fixed order (deterministic, unlike float atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + k * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# --- launch configuration -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(p: Plan, sms: int) -> dict:
    """Block shape for one row (``sms`` kept for callers; unused now), from the sweep on an H200
    (bench/gpu_kernels.py --sweep; BENCHMARKS.md).

    Int codes: 4 rows x 64 words (4 groups of 128) per iteration; long rows (in >= 8192) do better with 8 rows x
    128 words, software-pipelined 3 deep. (The last sweep found 8 x 128 words, 3 stages *plus* ``PREFETCH`` 5-10%
    faster on all three shapes; that combination has not yet run under tests/test_kernels.py on a GPU, so it is
    not the default yet.) Codebooks: the [rows, groups, words, 8 codes] variant with the
    16-value table (every lane of a warp reads the same 64-byte line, one L1 wavefront; the 256-entry pair table
    spreads a warp over 16 lines and was 1.4x slower), unpipelined (pipelining turns the table lookups into
    asynchronous copies and was 15x slower).
    """
    group_w = p.group // CODES_PER_WORD
    if p.kind == 2:
        return {"BLOCK_N": 8, "BLOCK_G": max(1, 64 // group_w), "num_warps": 4, "STAGES": 1, "VARIANT": "4d",
                "LUT16": True}
    if p.in_features >= 8192:
        return {"BLOCK_N": 8, "BLOCK_G": max(1, 128 // group_w), "num_warps": 4, "STAGES": 3}
    return {"BLOCK_N": 4, "BLOCK_G": max(1, 64 // group_w), "num_warps": 4, "STAGES": 1}


def gemm_config(p: Plan, m: int, sms: int) -> dict:
    """Block shape for 2..64 rows (measured as gemv_config): split-K 8 (with 4..8 iterations per split) keeps
    every SM streaming; codebook tiles stay narrow (their table lookups cost registers)."""
    block_m = max(16, triton.next_power_of_2(m))
    lut16 = {}
    if p.kind == 2:
        block_n, stages = (32 if m <= 16 else 128), 2
        if m > 16:  # wide tiles: the 16-value table wins (fewer L1 wavefronts); narrow ones: the pair table
            lut16 = {"LUT16": True}
    else:
        block_n, stages = (64 if m <= 4 else 128 if m <= 16 else 64), 4
    n_iters = triton.cdiv(p.in_features, p.group)
    split_k = 8 if m <= 16 or p.kind == 2 else 4
    while split_k > 1 and n_iters < 4 * split_k:
        split_k //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": stages,
            **lut16}


# --- launchers ------------------------------------------------------------------------------------------
def gemv(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         config: dict | None = None) -> torch.Tensor:
    """``out [N] = W @ x + b`` for one contiguous row ``x [K]`` (bf16/fp16, 4-byte aligned)."""
    config = config or gemv_config(p, _sm_count(x.device.index or 0))
    cfg = dict(config)
    block_n = cfg.pop("BLOCK_N")
    variant = cfg.pop("VARIANT", "pairs")
    grid = (triton.cdiv(p.out_features, block_n),)
    if variant == "pairs":
        kernel, x_arg, tables = _gemv_kernel, x.view(torch.int32), (ops.pairs,)
        cfg["X_BF16"] = x.dtype == torch.bfloat16
    else:
        kernel, x_arg, tables = _gemv4d_kernel, x, (ops.pairs, ops.values)
    kernel[grid](
        x_arg, ops.words, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, *tables,
        bias if bias is not None else ops.scale, out,
        p.out_features, p.in_features // CODES_PER_WORD, triton.cdiv(p.in_features, p.group), ops.words.stride(0),
        p.scale_row_stride, p.group_step, p.zero_row_stride,
        GROUP_W=p.group // CODES_PER_WORD, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, **cfg,
    )
    return out


def gemm(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         config: dict | None = None) -> torch.Tensor:
    """``out [M, N] = x @ W^T + b`` for ``x [M, K]`` (rows contiguous, bf16/fp16), M small."""
    m = x.shape[0]
    config = config or gemm_config(p, m, _sm_count(x.device.index or 0))
    cfg = dict(config)
    block_m, block_n, split_k = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("SPLIT_K")
    n_iters = triton.cdiv(p.in_features, p.group)
    per_split = triton.cdiv(n_iters, split_k)
    split_k = triton.cdiv(n_iters, per_split)  # no empty splits
    target = out if split_k == 1 else torch.empty(split_k, m, p.out_features, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(p.out_features, block_n), triton.cdiv(m, block_m), split_k)
    has_bias = bias is not None
    _gemm_kernel[grid](
        x, ops.codes, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.pairs, ops.values,
        bias if has_bias else ops.scale, target,
        m, p.out_features, p.in_features, n_iters, x.stride(0), out.stride(0), ops.codes.stride(0),
        p.scale_row_stride, p.group_step, p.zero_row_stride, per_split,
        GROUP=p.group, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=has_bias, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, **cfg,
    )
    if split_k > 1:
        mn = m * p.out_features
        block = 1024
        _splitk_sum[(triton.cdiv(mn, block),)](
            target, bias if has_bias else target, out, mn, p.out_features,
            SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block,
        )
    return out
