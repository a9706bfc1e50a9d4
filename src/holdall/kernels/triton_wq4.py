"""Triton kernels for ``y = x @ W^T (+ b)`` with a 4-bit packed ``W``, read in place (no dequantized copy).

Every kernel is checked against :func:`holdall.kernels.packed.reference_linear` (the plain-torch decode +
float32 matmul beside them) by ``tests/test_kernels.py``; the launchers take a config dict whose ``VARIANT``
picks the kernel, and :func:`gemv_config` / :func:`gemm_config` hold the defaults.

* One row (decode), :func:`gemv`: bandwidth-bound in principle.
  - ``_gemv_tma_kernel`` ("tma", round 5, the default on Hopper for every format whose rows are whole
    groups): the weight tiles ``[rows, groups, words]`` come by TMA (a host tensor descriptor; Triton's
    pipelining keeps several in flight with no address arithmetic in the threads), int codes become the
    float32 ``128 + q`` in one PRMT each and NF4/FP4 codes are looked up in a register-held table; per word
    and row 8 FMAs, minus ``(128 + zero) * sum(x)`` for int codes, times the group scale. Its loop is
    issue-bound (5.6 thread-instructions per code at the 4096-input default, ``bench/sass_stats.py gemv_tma``);
    round 7 added ``XVEC`` (a word's 8 activations in one 16-byte load), ``EVEN_G`` (no group masks when the
    groups fill whole tiles) and the epilogue halves of an RMSNorm between two GEMVs (``NORM_OUT`` /
    ``NORM_IN``, for the static decoder); round 8 ``RPT`` (the tile split so each thread holds 2-4 rows of one
    word position: the activations it unpacks serve them all; 4.4 per code with ``EVEN_N``, the int default)
    and ``XQ8`` (int8 activations, 8 per power-of-two scale, times the int codes by DP4A: W4A8, asked for
    through :func:`holdall.kernels.dispatch.project_int8`; 2.2-3.5 per code), with ``Q8_OUT`` / ``XIN8`` a
    producer's epilogue writing the next row as those int8 words so the consumer skips its rounding (1.8-2.8
    per code; the decoder's default with int8 activations since round 9, +0.5%). Round 9: ``GLU`` (a stacked
    gate/up layer's GEMV writes ``silu(gate) * up``: each gate row beside its up row in one TMA box).
  - ``_gemv_kernel`` ("pairs", the int default without TMA): each program streams ``BLOCK_N`` weight rows as int32 words
    (8 codes), tiled ``[rows, groups, words per group]`` so a group's scale/zero is loaded once per thread and
    applied once per word. Int codes become floats without a conversion instruction: ``nibble | 0x4B000000``
    is the float ``2**23 + nibble``, so one subtraction of ``2**23 + zero`` yields ``code - zero`` exactly.
    ``x`` is read as int32 pairs (a bf16 pair becomes two floats by two bit operations). ``STAGES`` software-
    pipelines the weight loads, ``PREFETCH`` double-buffers them in registers. ``SPLIT_K`` splits the groups
    over programs (float32 partials, ordered sum): a launch option, not a default (no gain at any shape swept
    on an H200, round 3).
  - ``_gemv4d_kernel`` ("4d", the codebook default without TMA): ``[rows, groups, words, 8 codes]`` tiles, one
    vector load of a word's 8 activations, NF4/FP4 values from a 16-entry table (``LUT16``; all lanes of a warp
    on one 64-byte line).
  - ``_gemv2_kernel`` ("v2", round 2, not a default): 4 rows held by every thread, one shift + one LOP3 + one
    FMA per code (offsets and zero points taken off per word from sums of ``x``). Half the instructions per
    code in the compiled loop, yet 2.6x slower on an H200: kept, tested, for the next round.
  - ``"mma"`` (round 4, not a default): the row through ``_gemm2_kernel`` below, padded to 16 MMA columns;
    10-30% slower than the pairs kernel on an H200 (109 registers per thread, latency-bound).
* 2..64 rows, :func:`gemm` (tensor cores):
  - ``"gluon_mma"`` (rounds 12-14, :mod:`holdall.kernels.gluon_mma`, the default on a Hopper for 2..8 rows of int4
    sym layers (groups of 64+, double-quantized scales too) with up to 11008-input rows and 2..16 rows of NF4 /
    FP4): the rows as the columns of ``mma.sync`` in Gluon, 1.05-1.6x faster than v3 there on an H200.
  - ``"gluon_wgmma"`` (rounds 15-16, :mod:`holdall.kernels.gluon_wgmma`, the default on a Hopper for 17..64 rows
    of int4 sym (whole-chunk groups) and NF4 / FP4, 1.0-1.5x faster than v3 there): ``wgmma`` with the decoded
    weights as its register operand and the activations staged per chunk in shared memory (or reordered once and
    brought in by TMA, for tall layers).
  - ``_gemm3_kernel`` ("v3", round 6, the default otherwise when rows are whole groups): the weight as the MMA's left
    operand, a group's inputs reordered on both sides into the order the MMA's register fragments hold them
    (:func:`_fragment_order`), so each thread loads its own codes as whole words and decodes them straight into
    the MMA's operand layout (no shared-memory round trip, MMAs pipelined); one PRMT or register-table lookup
    per code, the scale folded in 16-bit pairs inside the PTX (``FOLD16``, default) or by one float32 FMA,
    group scales prefetched an iteration ahead; split-K summed by each tile's last program.
  - ``_gemm2_kernel`` ("v2", round 2, the default for a partial last group): the weight is the MMA's left
    operand (``y^T = W x^T``), so 64..128 weight rows fill Hopper's 64-row MMA and the few input rows its N;
    bytes decoded in natural input order, one group per iteration; int codes with the scale folded into the
    decoded bf16/fp16 weight (``FOLD``) and one chained dot, codebooks with the scale on the float32 partial.
    Split-K (float32 partials summed in a fixed order, so results are deterministic) buys parallelism.
    Round 4 (the 2..16-row default): ``PACKED`` decodes two codes per PTX instruction into the exact
    ``128 + q`` (:func:`_nibbles16`) or looks NF4/FP4 up in a register-held table (:func:`_table16`), and
    ``SEM`` lets each tile's last program sum the split-K partials (no ``_splitk_sum`` launch).
  - ``_gemm_kernel`` ("v1", round 1): ``x`` as the left operand, even/odd-nibble split into two dots.

Where these stand (H200, BENCHMARKS.md "GPU: 4-bit kernels (issue 6)", rounds 5-6): GEMV 1.7-1.9x bf16 cuBLAS
for int4 sym, 1.5-1.7x asym, 1.1-1.4x NF4, 0.95-1.2x NF4 + double quant (~35% of copy bandwidth at best:
latency-bound); GEMM at 4..16 rows int4 1.37-1.86x, NF4 0.96-1.12x (4 rows); at 64 rows 0.59-1.03x. Rounds
10-13 (Gluon GEMVs, PDL, the tensor-core GEMV) moved int4 sym to 2.5-2.8x at one row (3.3-3.5x with int8
activations) and 1.87-2.33x at 2..8 rows, NF4 / NF4 + double quant to 1.10-1.58x at 2..16 rows; rounds 15-16
(the wgmma GEMM) int4 sym to 1.22-1.43x at 17..32 rows and 0.83-1.22x at 64, NF4 to 0.96-1.09x / 0.74-0.92x.

This module imports Triton at the top: import it only when a CUDA launch is about to happen
(``holdall.kernels.dispatch`` does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import ptx
from .packed import CODES_PER_WORD, Operands, Plan

try:  # host-side TMA descriptors (recent Tritons; 3.6 on the device); without them the pointer-load kernels serve
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

_MAGIC = tl.constexpr(8388608.0)  # 2**23: the float whose low mantissa bits are an OR-ed-in integer


@triton.jit
def _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, index, mask, SCALE_DQ: tl.constexpr):
    """float32 scales at flattened ``index``; double-quantized ones as ``map[code] * absmax[idx // 256] + offset``."""
    raw, nested = _scale_raw(s_ptr, sabs_ptr, index, mask, SCALE_DQ)
    return _scale_value(raw, nested, soff_ptr, dmap_ptr, SCALE_DQ)


@triton.jit
def _scale_raw(s_ptr, sabs_ptr, index, mask, SCALE_DQ: tl.constexpr):
    """What :func:`_group_scale` loads from global memory, without the table lookup: ``(scale, scale)``, or the
    double-quantized ``(code, nested absmax)`` -- a value prefetched an iteration early holds no dependent load."""
    if SCALE_DQ:
        return (tl.load(s_ptr + index, mask=mask, other=0).to(tl.int32),
                tl.load(sabs_ptr + index // 256, mask=mask, other=0.0))
    else:
        s = tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)
        return s, s


@triton.jit
def _scale_value(raw, nested, soff_ptr, dmap_ptr, SCALE_DQ: tl.constexpr):
    """The float32 scale from :func:`_scale_raw`'s pair (the 1 KB map of a double-quantized code stays in L1)."""
    if SCALE_DQ:
        return tl.load(dmap_ptr + raw) * nested + tl.load(soff_ptr)
    else:
        return raw


@triton.jit
def _group_zero(z_ptr, row, group, zero_row_stride, mask):
    """Asymmetric zero point (int32) of (row, group): 4-bit codes packed two per byte, even group high."""
    return _zero_nibble(_zero_byte(z_ptr, row, group, zero_row_stride, mask), group)


@triton.jit
def _zero_byte(z_ptr, row, group, zero_row_stride, mask):
    """The byte (int32) holding the zero points of groups ``group`` and its pair partner, for each ``row``."""
    return tl.load(z_ptr + row * zero_row_stride + group // 2, mask=mask, other=0).to(tl.int32)


@triton.jit
def _zero_nibble(packed, group):
    """Group ``group``'s zero point out of its :func:`_zero_byte` (even groups in the high nibble)."""
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
    N, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride, groups_per_split,
    GROUP_W: tl.constexpr,  # int32 words per group (group / 8)
    KIND: tl.constexpr,  # 0 int sym, 1 int asym, 2 codebook
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per program
    BLOCK_G: tl.constexpr,  # groups per loop iteration
    X_BF16: tl.constexpr,  # x is bf16 (else fp16); x_ptr points at it as int32 pairs
    STAGES: tl.constexpr = 1,  # software pipelining depth of the weight loads (bytes in flight)
    PREFETCH: tl.constexpr = False,  # load the next tile's words before decoding this one (registers)
    SPLIT_K: tl.constexpr = 1,  # > 1: program (i, k) sums groups [k, k + 1) x groups_per_split into float32
    # partials [SPLIT_K, N] at y_ptr, for _splitk_sum (groups_per_split a multiple of BLOCK_G)
):
    pid = tl.program_id(0)
    start = tl.program_id(1) * groups_per_split
    stop = tl.minimum(start + groups_per_split, n_groups)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = rn[:, None, None]  # [BN, 1, 1]
    n_ok = n3 < N
    rg = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1]
    rj = tl.arange(0, GROUP_W)[None, None, :]  # [1, 1, GW]
    w_rows = w_ptr + n3 * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_G, GROUP_W], dtype=tl.float32)
    if PREFETCH:
        first = (start + rg) * GROUP_W + rj
        w_next = tl.load(w_rows + first, mask=n_ok & (first < KW), other=0)
    for g0 in tl.range(start, stop, BLOCK_G, num_stages=STAGES):
        g3 = g0 + rg
        kw3 = g3 * GROUP_W + rj  # [1, BG, GW] word index along the row
        k_ok = kw3 < KW
        if PREFETCH:  # the next tile's DRAM latency overlaps this tile's decode
            w = w_next
            after = kw3 + BLOCK_G * GROUP_W
            w_next = tl.load(w_rows + after, mask=n_ok & (after < KW) & (g0 + BLOCK_G < stop), other=0)
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
    if SPLIT_K > 1:
        tl.store(y_ptr + tl.program_id(1) * N + rn, y, mask=rn < N)
    else:
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


@triton.jit
def _byte_dot(p, w, pair, magic, val_ptr, J: tl.constexpr, KIND: tl.constexpr, X_BF16: tl.constexpr):
    """``p + (16 + q_hi) x_even + (256 + q_lo) x_odd`` for byte ``J`` of each word, float32 (codebooks:
    ``p + value[q_hi] x_even + value[q_lo] x_odd``, the 16-entry table on one 64-byte line).

    One shift serves both codes of the byte: the high nibble (bit 8j+4, even input) lands on mantissa bits
    19..22 of 1.0, the low nibble (bit 8j, odd input) on bits 15..18, so one AND-OR (LOP3) per code gives the
    float ``1 + q/16`` / ``1 + q/256``, with no int-to-float conversion and no subtraction. ``magic`` is
    ``0x3F800000`` passed at run time: with the masks as immediates ptxas splits each AND-OR into two LOP3s.
    """
    x_even, x_odd = _unpack_pair(pair, X_BF16)
    if KIND == 2:
        p = tl.fma(tl.load(val_ptr + ((w >> (8 * J + 4)) & 0xF)), x_even, p)
        return tl.fma(tl.load(val_ptr + ((w >> (8 * J)) & 0xF)), x_odd, p)
    if 15 - 8 * J >= 0:
        v = w << (15 - 8 * J)
    else:
        v = w >> (8 * J - 15)
    hi = ((v & 0x00780000) | magic).to(tl.float32, bitcast=True)
    lo = ((v & 0x00078000) | magic).to(tl.float32, bitcast=True)
    p = tl.fma(hi, x_even * 16.0, p)
    return tl.fma(lo, x_odd * 256.0, p)


@triton.jit
def _row_part(acc, w_ptr, row, kw, x0, x1, x2, x3, c, xs, magic, val_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr,
              dmap_ptr, g, gs,
              stride_wn, scale_row_stride, zero_row_stride, k_ok, g_ok,
              KIND: tl.constexpr, SCALE_DQ: tl.constexpr, X_BF16: tl.constexpr, MASK_K: tl.constexpr):
    """One weight row's share of a tile: ``acc += ((16 + q) x ... - offsets) * scale`` per word."""
    if MASK_K:
        w = tl.load(w_ptr + row * stride_wn + kw, mask=k_ok, other=0)  # [BG, GW] int32
    else:
        w = tl.load(w_ptr + row * stride_wn + kw)
    p = _byte_dot(-c, w, x0, magic, val_ptr, 0, KIND, X_BF16)  # from -offsets: p ends as sum (q - z) x
    p = _byte_dot(p, w, x1, magic, val_ptr, 1, KIND, X_BF16)
    p = _byte_dot(p, w, x2, magic, val_ptr, 2, KIND, X_BF16)
    p = _byte_dot(p, w, x3, magic, val_ptr, 3, KIND, X_BF16)
    s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, row * scale_row_stride + gs, g_ok, SCALE_DQ)  # [BG, 1]
    if KIND == 1:
        zero = _group_zero(z_ptr, row, gs, zero_row_stride, g_ok).to(tl.float32)  # [BG, 1]
        return tl.fma(p - zero * xs, s, acc)
    else:
        return tl.fma(p, s, acc)


@triton.jit
def _gemv2_tile(acc0, acc1, acc2, acc3, x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, n0, N,
                g0, rg, rj,
                magic, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
                GROUP_W: tl.constexpr, KIND: tl.constexpr, SCALE_DQ: tl.constexpr, X_BF16: tl.constexpr,
                ROWS: tl.constexpr, MASK_K: tl.constexpr):
    """One ``[groups, words]`` tile for ``ROWS`` weight rows: the activations are loaded and converted once and
    every row held by the thread reuses them (the row loop is unrolled, so each row has its own registers)."""
    g = g0 + rg  # [BG, 1]
    kw = g * GROUP_W + rj  # [BG, GW] word index along the row
    gs = g * group_step
    if MASK_K:
        k_ok = kw < KW
        g_ok = g < n_groups
        x0 = tl.load(x_ptr + kw * 4, mask=k_ok, other=0)
        x1 = tl.load(x_ptr + kw * 4 + 1, mask=k_ok, other=0)
        x2 = tl.load(x_ptr + kw * 4 + 2, mask=k_ok, other=0)
        x3 = tl.load(x_ptr + kw * 4 + 3, mask=k_ok, other=0)
    else:
        k_ok = tl.full([1, 1], 1, tl.int1)
        g_ok = tl.full([1, 1], 1, tl.int1)
        x0 = tl.load(x_ptr + kw * 4)  # x as int32 pairs (x[8w + 2j], x[8w + 2j + 1])
        x1 = tl.load(x_ptr + kw * 4 + 1)
        x2 = tl.load(x_ptr + kw * 4 + 2)
        x3 = tl.load(x_ptr + kw * 4 + 3)
    # c: the offsets 16 x_even + 256 x_odd (plus the implicit zero 8 for symmetric codes); xs: sum of x
    c = tl.zeros(kw.shape, dtype=tl.float32)
    xs = tl.zeros(kw.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        pair = x0
        if j == 1:
            pair = x1
        if j == 2:
            pair = x2
        if j == 3:
            pair = x3
        x_even, x_odd = _unpack_pair(pair, X_BF16)
        if KIND == 1:
            c += x_even * 16.0 + x_odd * 256.0
            xs += x_even + x_odd
        elif KIND == 0:
            c += x_even * 24.0 + x_odd * 264.0
    # rows past N re-read row N - 1 (no masks in the loop); their results are never stored
    acc0 = _row_part(acc0, w_ptr, tl.minimum(n0, N - 1), kw, x0, x1, x2, x3, c, xs, magic, val_ptr, s_ptr,
                     z_ptr, sabs_ptr, soff_ptr, dmap_ptr, g, gs, stride_wn, scale_row_stride, zero_row_stride,
                     k_ok, g_ok, KIND, SCALE_DQ, X_BF16, MASK_K)
    if ROWS > 1:
        acc1 = _row_part(acc1, w_ptr, tl.minimum(n0 + 1, N - 1), kw, x0, x1, x2, x3, c, xs, magic, val_ptr, s_ptr,
                         z_ptr, sabs_ptr, soff_ptr, dmap_ptr, g, gs, stride_wn, scale_row_stride, zero_row_stride,
                         k_ok, g_ok, KIND, SCALE_DQ, X_BF16, MASK_K)
    if ROWS > 2:
        acc2 = _row_part(acc2, w_ptr, tl.minimum(n0 + 2, N - 1), kw, x0, x1, x2, x3, c, xs, magic, val_ptr, s_ptr,
                         z_ptr, sabs_ptr, soff_ptr, dmap_ptr, g, gs, stride_wn, scale_row_stride, zero_row_stride,
                         k_ok, g_ok, KIND, SCALE_DQ, X_BF16, MASK_K)
        acc3 = _row_part(acc3, w_ptr, tl.minimum(n0 + 3, N - 1), kw, x0, x1, x2, x3, c, xs, magic, val_ptr, s_ptr,
                         z_ptr, sabs_ptr, soff_ptr, dmap_ptr, g, gs, stride_wn, scale_row_stride, zero_row_stride,
                         k_ok, g_ok, KIND, SCALE_DQ, X_BF16, MASK_K)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
    N, KW, n_groups, n_full, stride_wn, scale_row_stride, group_step, zero_row_stride, magic,
    GROUP_W: tl.constexpr,  # int32 words per group (group / 8)
    KIND: tl.constexpr,  # 0 int sym, 1 int asym, 2 codebook
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # weight rows per program: 1, 2 or 4 (each thread holds all of them)
    BLOCK_G: tl.constexpr,  # groups per loop iteration
    X_BF16: tl.constexpr,  # x is bf16 (else fp16); x_ptr points at it as int32 pairs
    STAGES: tl.constexpr = 1,
):
    """One row with about half the instructions per code of :func:`_gemv_kernel` in the compiled loop (round
    2) -- but measured 2.6x *slower* on an H200 (48 vs 18.6 us at 4096x11008; why is the next round's question:
    look at occupancy, the per-row scale loads and the four cross-warp sums first). Not a default.

    * Decode: see :func:`_byte_dot` (one shift per byte, one LOP3 and one FMA per code, nothing else).
    * The offsets ``16 x_even + 256 x_odd`` and the zero point are taken off once per word per row (``c``),
      computed once per thread from ``x`` for all ``ROWS`` rows; the cancellation costs at most ~8 of float32's
      24 bits (a word's partial keeps ~1e-6 relative accuracy).
    * Every thread holds all ``ROWS`` rows of its words, so one load and conversion of ``x`` serves them all
      (Triton's own layout would give each thread one row).
    * Full tiles (``n_full``) run without masks; the last, partial tile runs masked.
    """
    pid = tl.program_id(0)
    n0 = pid * ROWS
    rg = tl.arange(0, BLOCK_G)[:, None]  # [BG, 1]
    rj = tl.arange(0, GROUP_W)[None, :]  # [1, GW]
    acc0 = tl.zeros([BLOCK_G, GROUP_W], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_G, GROUP_W], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_G, GROUP_W], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_G, GROUP_W], dtype=tl.float32)
    for g0 in tl.range(0, n_full * BLOCK_G, BLOCK_G, num_stages=STAGES):
        acc0, acc1, acc2, acc3 = _gemv2_tile(
            acc0, acc1, acc2, acc3, x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, n0, N, g0,
            rg, rj, magic, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
            GROUP_W, KIND, SCALE_DQ, X_BF16, ROWS, False)
    if n_full * BLOCK_G < n_groups:
        acc0, acc1, acc2, acc3 = _gemv2_tile(
            acc0, acc1, acc2, acc3, x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, n0, N,
            n_full * BLOCK_G, rg, rj, magic, KW, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
            GROUP_W, KIND, SCALE_DQ, X_BF16, ROWS, True)
    out_ty = y_ptr.dtype.element_ty
    y = tl.sum(tl.sum(acc0, axis=1), axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n0).to(tl.float32)
    tl.store(y_ptr + n0, y.to(out_ty))  # n0 < N always
    if ROWS > 1:
        y = tl.sum(tl.sum(acc1, axis=1), axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + n0 + 1, mask=n0 + 1 < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + n0 + 1, y.to(out_ty), mask=n0 + 1 < N)
    if ROWS > 2:
        y = tl.sum(tl.sum(acc2, axis=1), axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + n0 + 2, mask=n0 + 2 < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + n0 + 2, y.to(out_ty), mask=n0 + 2 < N)
        y = tl.sum(tl.sum(acc3, axis=1), axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + n0 + 3, mask=n0 + 3 < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + n0 + 3, y.to(out_ty), mask=n0 + 3 < N)


_ASM_NIB_F32 = tl.constexpr(ptx.nibbles_f32_asm())


@triton.jit
def _code_f32(w, K: tl.constexpr):
    """Code at bits ``4K..4K+3`` of each word as the float32 ``128 + q``: one shift and one AND-OR."""
    if K <= 4:
        v = w << (16 - 4 * K)
    else:
        v = w >> (4 * K - 16)  # arithmetic shift: the sign bits land above the mask
    return ((v & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _codes_f32(w, PRMT: tl.constexpr):
    """The 8 codes of every int32 word of ``w`` as float32 ``128 + q``, in input order (code ``c`` sits at bit
    ``4 (c ^ 1)``): one PRMT each in inline PTX (:func:`holdall.kernels.ptx.nibbles_f32_asm`), or two integer
    instructions each without it."""
    if PRMT:
        return tl.inline_asm_elementwise(_ASM_NIB_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], (tl.float32,) * 8, True, 1)
    return (_code_f32(w, 1), _code_f32(w, 0), _code_f32(w, 3), _code_f32(w, 2),
            _code_f32(w, 5), _code_f32(w, 4), _code_f32(w, 7), _code_f32(w, 6))


_ASM_NF4_F32 = tl.constexpr(ptx.table_f32_asm("nf4"))
_ASM_FP4_F32 = tl.constexpr(ptx.table_f32_asm("fp4"))


@triton.jit
def _book_code(w, val_ptr, K: tl.constexpr):
    """Code at bits ``4K..4K+3`` of each word looked up in the 16-value float32 table at ``val_ptr``."""
    return tl.load(val_ptr + ((w >> (4 * K)) & 0xF))


@triton.jit
def _book_f32(w, val_ptr, BOOK: tl.constexpr):
    """The 8 codes of every int32 word of ``w`` as float32 codebook values, in input order: from registers
    (``BOOK`` 1 NF4, 2 FP4: :func:`holdall.kernels.ptx.table_f32_asm`, bf16-rounded values) or, with ``BOOK``
    0, from the float32 table at ``val_ptr`` (memory loads: keep Triton's pipelining off then)."""
    if BOOK == 1:
        return tl.inline_asm_elementwise(_ASM_NF4_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], (tl.float32,) * 8, True, 1)
    elif BOOK == 2:
        return tl.inline_asm_elementwise(_ASM_FP4_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], (tl.float32,) * 8, True, 1)
    return (_book_code(w, val_ptr, 1), _book_code(w, val_ptr, 0), _book_code(w, val_ptr, 3),
            _book_code(w, val_ptr, 2), _book_code(w, val_ptr, 5), _book_code(w, val_ptr, 4),
            _book_code(w, val_ptr, 7), _book_code(w, val_ptr, 6))


@triton.jit
def _rows_of(t, RPT: tl.constexpr):
    """A ``[BN, BG, GW]`` tile as ``RPT`` tiles ``[BN / RPT, BG, GW]`` of rows ``r, r + RPT, r + 2 RPT, ...``
    (returned for ``r = 0, 1, 2, 3``; repeats where ``RPT < 4``). The splits make Triton give each thread the
    ``RPT`` rows of one word position, so the activations it unpacks serve ``RPT`` rows instead of one."""
    BN: tl.constexpr = t.shape[0]
    BG: tl.constexpr = t.shape[1]
    GW: tl.constexpr = t.shape[2]
    if RPT == 2:
        r0, r1 = tl.split(tl.permute(tl.reshape(t, [BN // 2, 2, BG, GW]), (0, 2, 3, 1)))
        return r0, r1, r0, r1
    elif RPT == 4:  # row 4 i + 2 hi + lo
        lo0, lo1 = tl.split(tl.permute(tl.reshape(t, [BN // 4, 2, 2, BG, GW]), (0, 3, 4, 1, 2)))
        r0, r2 = tl.split(lo0)
        r1, r3 = tl.split(lo1)
        return r0, r1, r2, r3
    else:
        return t, t, t, t


@triton.jit
def _word_dot(w, x0, x1, x2, x3, x4, x5, x6, x7, xs, val_ptr, z_ptr, rows, gs, zero_row_stride, ok,
              KIND: tl.constexpr, PRMT: tl.constexpr, BOOK: tl.constexpr):
    """``sum_c value_c x_c`` per word of ``w`` (``[rows, BG, GW]``), the int codes' ``128 + zero`` offset taken
    off through the word's activation sum ``xs``: 8 FMAs and one more per word and row."""
    x = (x0, x1, x2, x3, x4, x5, x6, x7)
    if KIND == 2:  # codebook values: no offset to take off
        q = _book_f32(w, val_ptr, BOOK)
        return _fma_chain(q[0] * x0, q, x, 1)
    if KIND == 1:
        zero = _group_zero(z_ptr, rows, gs, zero_row_stride, ok).to(tl.float32)  # [rows, BG, 1]
        part = xs * -(128.0 + zero)
    else:
        part = xs * -136.0
    return _fma_chain(part, _codes_f32(w, PRMT), x, 0)


@triton.jit
def _fma_chain(part, q, x, START: tl.constexpr):
    """``part + q[i] x[i]`` for ``i = START..7`` as one chain of FMAs, in that order (a word's 8 codes and their
    activations; the one-row kernels, Triton's and Gluon's, sum in exactly this order)."""
    for i in tl.static_range(START, 8):
        part = q[i] * x[i] + part
    return part


_ASM_QUANT_S8 = tl.constexpr(ptx.quantize_s8_asm())
_ASM_DOT_S8 = tl.constexpr(ptx.dot_s8_asm())
_MAGIC_F32 = tl.constexpr(ptx.MAGIC_F32)  # 1.5 * 2**23: + it rounds to an integer in the low mantissa bits
_MAGIC_INT = tl.constexpr(ptx.MAGIC_INT)  # ... whose float bits, read as an int, are _MAGIC_INT + the integer


@triton.jit
def _pow2_scales(amax):
    """``(1 / scale, scale)`` of int8 words whose absmax is ``amax``: ``scale = 2**(E - 6)`` (``E`` its exponent,
    at least -95), so ``amax / scale`` lands in [64, 128) and the division by it is an exact multiplication."""
    e = tl.maximum(amax.to(tl.int32, bitcast=True) >> 23, 32)  # biased exponent; tiny or zero words: 2**-95
    return ((260 - e) << 23).to(tl.float32, bitcast=True), ((e - 6) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _s8_bits(p):
    """``p`` (float32, already divided by the scale and capped at 127) rounded to the nearest integer, ties to
    even, as its int8 byte in the low 8 bits of an int32 (plain Triton; exact where the product is not fused)."""
    return (p + _MAGIC_F32).to(tl.int32, bitcast=True) & 0xFF


@triton.jit
def _s8_byte(packed, i: tl.constexpr):
    """Signed byte ``i`` of each int32 of ``packed`` (int32)."""
    return (packed << (24 - 8 * i)) >> 24


@triton.jit
def _quantize_word(x0, x1, x2, x3, x4, x5, x6, x7, PTX: tl.constexpr):
    """A word's 8 activations (float32, ``[1, BG, GW]``) as int8 times one power-of-two scale per word:
    ``(odd, even, total, scale)`` -- the int8 of the odd inputs packed in one int32 (the words' low nibbles
    are the odd inputs' codes), the even ones in another, their int sum, the scale. The scale ``2**(E - 6)``
    (``E`` the exponent of the word's absmax) puts the absmax in [64, 128): dividing by it is exact, so only
    the rounding to an integer (nearest, ties to even; 128 clamped to 127) loses anything, and no division is
    needed. Exactly :func:`holdall.kernels.packed.quantize_activations_s8`; the rounding adds 1.5 * 2**23, in
    PTX where ptxas cannot fuse it with the product (``PTX``)."""
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                      tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    inv, scale = _pow2_scales(amax)
    p0 = tl.minimum(x0 * inv, 127.0)
    p1 = tl.minimum(x1 * inv, 127.0)
    p2 = tl.minimum(x2 * inv, 127.0)
    p3 = tl.minimum(x3 * inv, 127.0)
    p4 = tl.minimum(x4 * inv, 127.0)
    p5 = tl.minimum(x5 * inv, 127.0)
    p6 = tl.minimum(x6 * inv, 127.0)
    p7 = tl.minimum(x7 * inv, 127.0)
    if PTX:
        odd, even, total = tl.inline_asm_elementwise(_ASM_QUANT_S8, "=r,=r,=r,f,f,f,f,f,f,f,f",
                                                     [p0, p1, p2, p3, p4, p5, p6, p7],
                                                     (tl.int32, tl.int32, tl.int32), True, 1)
    else:  # plain Triton (the CPU interpreter: its products are exact, nothing to fuse)
        odd = _s8_bits(p1) | (_s8_bits(p3) << 8) | (_s8_bits(p5) << 16) | (_s8_bits(p7) << 24)
        even = _s8_bits(p0) | (_s8_bits(p2) << 8) | (_s8_bits(p4) << 16) | (_s8_bits(p6) << 24)
        total = (_s8_byte(odd, 0) + _s8_byte(odd, 1) + _s8_byte(odd, 2) + _s8_byte(odd, 3)
                 + _s8_byte(even, 0) + _s8_byte(even, 1) + _s8_byte(even, 2) + _s8_byte(even, 3))
    return odd, even, total, scale


@triton.jit
def _dot_s8(w, odd, even, c, PTX: tl.constexpr):
    """``c + sum_c q_c x_c`` (int32) over the 8 int codes of each word of ``w`` and the word's int8
    activations from :func:`_quantize_word`: two DP4As after three integer instructions (``PTX``)."""
    if PTX:
        return tl.inline_asm_elementwise(_ASM_DOT_S8, "=r,r,r,r,r", [w, odd, even, c], tl.int32, True, 1)
    else:
        lo = w & 0x0F0F0F0F  # codes of the odd inputs, one per byte
        hi = (w >> 4) & 0x0F0F0F0F
        return (c + ((lo & 0xFF) * _s8_byte(odd, 0) + ((lo >> 8) & 0xFF) * _s8_byte(odd, 1)
                     + ((lo >> 16) & 0xFF) * _s8_byte(odd, 2) + ((lo >> 24) & 0xFF) * _s8_byte(odd, 3))
                + ((hi & 0xFF) * _s8_byte(even, 0) + ((hi >> 8) & 0xFF) * _s8_byte(even, 1)
                   + ((hi >> 16) & 0xFF) * _s8_byte(even, 2) + ((hi >> 24) & 0xFF) * _s8_byte(even, 3)))


@triton.jit
def _tile_part(w, x0, x1, x2, x3, x4, x5, x6, x7, xs, s, val_ptr, z_ptr, rows, gs, ok, zero_row_stride,
               KIND: tl.constexpr, PRMT: tl.constexpr, BOOK: tl.constexpr, XQ8: tl.constexpr):
    """One row tile's scaled dot products for an iteration: ``rows [R, 1, 1]``, ``w [R, BG, GW]``, its group
    scales ``s [R, BG, 1]``. With ``XQ8`` the activations are a word's int8 (:func:`_quantize_word`): ``x0`` /
    ``x1`` the packed odd / even inputs, ``x2`` their scale, ``xs`` their int sum; the dot is exact in int32
    (``sum (q - zero) x8``, through the float32 magic ``1.5 * 2**23``), then scaled."""
    if XQ8:
        if KIND == 1:
            zero = _group_zero(z_ptr, rows, gs, zero_row_stride, ok)  # [rows, BG, 1] int32
            c = _MAGIC_INT - zero * xs
        else:
            c = _MAGIC_INT - 8 * xs
        dot = _dot_s8(w, x0, x1, c, PRMT).to(tl.float32, bitcast=True) - _MAGIC_F32
        return dot * x2 * s
    part = _word_dot(w, x0, x1, x2, x3, x4, x5, x6, x7, xs, val_ptr, z_ptr, rows, gs, zero_row_stride, ok,
                     KIND, PRMT, BOOK)
    return part * s


@triton.jit
def _row_values(acc, rn, ok, squares, b_ptr, k_inputs, eps, HAS_BIAS: tl.constexpr, NORM_IN: tl.constexpr):
    """Rows ``rn``'s float32 outputs from their accumulator ``[R, BG, GW]``: summed, times the norm's ``1 / rms``
    (``NORM_IN``: the mean square over the whole row), plus the bias at ``b_ptr + rn``."""
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [R]
    if NORM_IN:
        y = y * tl.rsqrt(squares / k_inputs + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    return y


@triton.jit
def _tile_out(acc, rn, N, squares, b_ptr, y_ptr, nw_ptr, h_ptr, k_inputs, eps, HAS_BIAS: tl.constexpr,
              NORM_IN: tl.constexpr, NORM_OUT: tl.constexpr):
    """Store rows ``rn`` of ``y`` from their accumulator ``[R, BG, GW]``; with ``NORM_OUT`` also write
    ``h = y * nw`` and return ``(sum of y^2 as stored, h as stored, in float32)``, else ``(0, 0)``."""
    y = _row_values(acc, rn, rn < N, squares, b_ptr, k_inputs, eps, HAS_BIAS, NORM_IN)
    y_out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, y_out, mask=rn < N)
    if NORM_OUT:  # the next norm's pieces, from the value as stored (the residual stream's rounding)
        yf = tl.where(rn < N, y_out.to(tl.float32), 0.0)
        nw = tl.load(nw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        h = (yf * nw).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rn, h, mask=rn < N)
        return tl.sum(yf * yf), h.to(tl.float32)
    else:
        return 0.0, 0.0


@triton.jit
def _glu_out(acc_gate, acc_up, rn, n_half, squares, b_ptr, y_ptr, k_inputs, eps, HAS_BIAS: tl.constexpr,
             NORM_IN: tl.constexpr):
    """``GLU``: store ``silu(gate) * up`` for gate rows ``rn`` (and their up rows ``n_half`` on), rounded as the
    separate path rounds them: each projection's output to ``y``'s dtype, SiLU computed in float32 and rounded,
    the product rounded (torch's ``F.silu(gate) * up`` on the stored rows)."""
    ok = rn < n_half
    g = _row_values(acc_gate, rn, ok, squares, b_ptr, k_inputs, eps, HAS_BIAS, NORM_IN)
    u = _row_values(acc_up, rn, ok, squares, b_ptr + n_half, k_inputs, eps, HAS_BIAS, NORM_IN)
    dt = y_ptr.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(y_ptr + rn, (act * u.to(dt).to(tl.float32)).to(dt), mask=ok)


@triton.jit
def _store_int8_words(h_even, h_odd, n0, q_out_ptr, qs_out_ptr, R: tl.constexpr):
    """The rows ``n0 .. n0 + 2R`` of ``h`` (``h_even [R]`` rows ``n0 + 2i``, ``h_odd`` rows ``n0 + 2i + 1``: the
    two sub-tiles of ``RPT 2``) as int8 words for the next GEMV (``XIN8``), exactly as :func:`_quantize_word`
    rounds them: per word of 8 rows, ``q_out[2w]`` the odd rows' int8, ``q_out[2w + 1]`` the even rows', and
    ``qs_out[w]`` the power-of-two scale. Each sub-tile's 4 consecutive entries are one word's half."""
    e4 = tl.reshape(h_even, [R // 4, 4])
    o4 = tl.reshape(h_odd, [R // 4, 4])
    amax = tl.maximum(tl.max(tl.abs(e4), axis=1), tl.max(tl.abs(o4), axis=1))  # [R / 4]
    inv, scale = _pow2_scales(amax)
    shifts = (tl.arange(0, 4) * 8)[None, :]
    q_even = _s8_bits(tl.minimum(e4 * inv[:, None], 127.0)) << shifts  # the min between: nothing to fuse
    q_odd = _s8_bits(tl.minimum(o4 * inv[:, None], 127.0)) << shifts
    words = n0 // 8 + tl.arange(0, R // 4)
    tl.store(q_out_ptr + 2 * words, tl.sum(q_odd, axis=1))  # disjoint bytes: the sum is their OR
    tl.store(q_out_ptr + 2 * words + 1, tl.sum(q_even, axis=1))
    tl.store(qs_out_ptr + words, scale)


@triton.jit
def _row_words(x_ptr, xs_ptr, kw3, g_ok, BLOCK_G: tl.constexpr, GROUP_W: tl.constexpr, X_BF16: tl.constexpr,
               XVEC: tl.constexpr, XQ8: tl.constexpr, XIN8: tl.constexpr, PRMT: tl.constexpr):
    """The activations of the words ``kw3 [1, BG, GW]`` as the dot products take them: float32 ``x0..x7`` and
    their sum ``xs``; with ``XQ8`` the int8 words ``(x0, x1) = (odd, even)``, their scale ``x2`` and int sum
    ``xs`` (rounded here, or with ``XIN8`` read as a ``Q8_OUT`` GEMV wrote them; ``x3..x7`` unused)."""
    if XIN8:  # (odd, even) int32 pairs and one scale per word
        xp = tl.load(x_ptr + kw3[:, :, :, None] * 2 + tl.arange(0, 2)[None, None, None, :],
                     mask=g_ok[:, :, :, None], other=0)  # [1, BG, GW, 2]
        x0, x1 = tl.split(xp)
        x2 = tl.load(xs_ptr + kw3, mask=g_ok, other=0.0)
        # their int sum: the DP4A dot with 8 codes of 1
        xs = _dot_s8(tl.full(x0.shape, 0x11111111, tl.int32), x0, x1, tl.zeros(x0.shape, tl.int32), PRMT)
        return x0, x1, x2, x2, x2, x2, x2, x2, xs
    else:
        return _float_words(x_ptr, kw3, g_ok, BLOCK_G, GROUP_W, X_BF16, XVEC, XQ8, PRMT)


@triton.jit
def _float_words(x_ptr, kw3, g_ok, BLOCK_G: tl.constexpr, GROUP_W: tl.constexpr, X_BF16: tl.constexpr,
                 XVEC: tl.constexpr, XQ8: tl.constexpr, PRMT: tl.constexpr):
    """:func:`_row_words` from the bf16/fp16 row (rounded to int8 here with ``XQ8``)."""
    x_word = x_ptr + kw3 * 4
    if XVEC:  # one 16-byte load per word's 8 activations, split in registers
        r4 = tl.arange(0, 4)[None, None, None, :]
        xv = tl.load(x_word[:, :, :, None] + r4, mask=g_ok[:, :, :, None], other=0)  # [1, BG, GW, 4]
        even, odd = tl.split(tl.reshape(xv, [1, BLOCK_G, GROUP_W, 2, 2]))  # words (0, 2) and (1, 3)
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
        x0, x1 = _unpack_pair(w0, X_BF16)  # word j holds activations 2j, 2j + 1
        x2, x3 = _unpack_pair(w1, X_BF16)
        x4, x5 = _unpack_pair(w2, X_BF16)
        x6, x7 = _unpack_pair(w3, X_BF16)
    else:
        x0, x1 = _unpack_pair(tl.load(x_word, mask=g_ok, other=0), X_BF16)
        x2, x3 = _unpack_pair(tl.load(x_word + 1, mask=g_ok, other=0), X_BF16)
        x4, x5 = _unpack_pair(tl.load(x_word + 2, mask=g_ok, other=0), X_BF16)
        x6, x7 = _unpack_pair(tl.load(x_word + 3, mask=g_ok, other=0), X_BF16)
    if XQ8:  # the word's int8 activations, packed (x0, x1), their scale (x2) and int sum (xs)
        q_odd, q_even, xs, scale = _quantize_word(x0, x1, x2, x3, x4, x5, x6, x7, PRMT)
        return q_odd, q_even, scale, scale, scale, scale, scale, scale, xs
    else:
        return x0, x1, x2, x3, x4, x5, x6, x7, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))


@triton.jit
def _rows_ok(rows, N, EVEN_N: tl.constexpr):
    """``rows < N``, or all true without a compare when the row tiles divide ``N`` (``EVEN_N``)."""
    if EVEN_N:
        return tl.full(rows.shape, True, tl.int1)
    else:
        return rows < N


@triton.jit
def _gemv_tma_tile(x_ptr, w_src, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
                   sq_in_ptr, n_sq, eps, nw_ptr, h_ptr, sq_out_ptr, xs_ptr, q_out_ptr, qs_out_ptr,
                   n0, N, n_half, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
                   GROUP_W: tl.constexpr, KIND: tl.constexpr, SCALE_DQ: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, X_BF16: tl.constexpr, STAGES: tl.constexpr,
                   TMA: tl.constexpr, PRMT: tl.constexpr, WS: tl.constexpr, BOOK: tl.constexpr,
                   NORM_IN: tl.constexpr, SQ_BLOCK: tl.constexpr, NORM_OUT: tl.constexpr, EVEN_G: tl.constexpr,
                   XVEC: tl.constexpr, RPT: tl.constexpr, XQ8: tl.constexpr,
                   EVEN_N: tl.constexpr, XIN8: tl.constexpr, Q8_OUT: tl.constexpr, GLU: tl.constexpr):
    """Rows ``n0 .. n0 + BLOCK_N`` of ``y``: the loop over the groups, ``STAGES`` deep (1 inside a flattened
    persistent loop, which pipelines across tiles itself). With ``RPT`` > 1 the tile is worked as ``RPT``
    interleaved row tiles whose words at one position sit in one thread (:func:`_rows_of`).

    An RMSNorm between two GEMVs is split over their epilogues, so the loop itself is untouched (work inside
    it is paid per code: an in-loop norm made the GEMVs 1.6x slower on an H200):
    ``NORM_OUT`` (the producer, e.g. ``o_proj`` with the residual as its bias) also writes ``h = y * nw`` (the
    next norm's weight, per output row) to ``h_ptr`` and this tile's sum of ``y^2`` to ``sq_out_ptr[tile]``;
    ``NORM_IN`` (the consumer, reading ``h`` as ``x``) sums the ``n_sq`` partials ``sq_in_ptr`` in a fixed order
    and multiplies its dot products by ``1 / rms = rsqrt(sum / K + eps)``.

    ``GLU`` (a stacked gate/up layer, ``RPT`` 2): sub-tile 0 is gate rows ``n0 .. n0 + BLOCK_N / 2``, sub-tile 1 the
    up rows ``n_half`` further on (one TMA box ``[BN / 2, 2, BG, GW]`` of the words viewed as ``[I, 2, G, GW]``),
    and the epilogue writes ``silu(gate) * up`` (:func:`_glu_out`) instead of either: the MLP's activation without
    a launch of its own."""
    R: tl.constexpr = BLOCK_N // RPT
    if GLU:  # gate rows n0 + i; the up rows are n_half further on
        ri = tl.arange(0, R)
        step = n_half
    else:  # rows n0 + RPT i + r of sub-tile r
        ri = tl.arange(0, R) * RPT
        step = 1
    rows0 = n0 + ri[:, None, None]  # [R, 1, 1]: rows of sub-tile 0; sub-tile r adds r * step
    rg = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1]
    rj = tl.arange(0, GROUP_W)[None, None, :]  # [1, 1, GW]
    acc0 = tl.zeros([R, BLOCK_G, GROUP_W], dtype=tl.float32)
    acc1 = tl.zeros([R, BLOCK_G, GROUP_W], dtype=tl.float32)
    acc2 = tl.zeros([R, BLOCK_G, GROUP_W], dtype=tl.float32)
    acc3 = tl.zeros([R, BLOCK_G, GROUP_W], dtype=tl.float32)
    squares = 0.0
    if NORM_IN:  # issued before the loop: the producer has finished, and the loads hide behind the weights
        rs = tl.arange(0, SQ_BLOCK)
        squares = tl.sum(tl.load(sq_in_ptr + rs, mask=rs < n_sq, other=0.0))
    for g0 in tl.range(0, n_groups, BLOCK_G, num_stages=STAGES, warp_specialize=WS):
        g3 = g0 + rg
        if EVEN_G:  # whole BLOCK_G tiles of groups: no mask (each costs a compare per load in the loop)
            g_ok = tl.full(g3.shape, True, tl.int1)
        else:
            g_ok = g3 < n_groups
        kw3 = g3 * GROUP_W + rj  # [1, BG, GW] word index along the row
        if GLU:  # row 2 i + h of the tile is gate row n0 + i (h = 0) or its up row (h = 1), split as _rows_of splits
            n3 = n0 + tl.arange(0, BLOCK_N)[:, None, None] // 2 + (tl.arange(0, BLOCK_N)[:, None, None] % 2) * n_half
            if TMA:  # one box [BN / 2, 2, BG, GW] of the [I, 2, groups, words] view
                w = tl.reshape(w_src.load([n0, 0, g0, 0]), [BLOCK_N, BLOCK_G, GROUP_W])
            else:
                w = tl.load(w_src + n3 * stride_wn + kw3, mask=(n3 < N) & g_ok, other=0)
        elif TMA:  # rows past N and groups past the end arrive as zeros
            w = w_src.load([n0, g0, 0])  # [BN, BG, GW] int32
        else:
            n3 = n0 + tl.arange(0, BLOCK_N)[:, None, None]  # [BN, 1, 1]
            w = tl.load(w_src + n3 * stride_wn + kw3, mask=(n3 < N) & g_ok, other=0)
        x0, x1, x2, x3, x4, x5, x6, x7, xs = _row_words(x_ptr, xs_ptr, kw3, g_ok, BLOCK_G, GROUP_W, X_BF16, XVEC,
                                                        XQ8, XIN8, PRMT)
        gs = g3 * group_step
        # the tile's scales as one [BN, BG, 1] block, split like the words (with RPT > 1 Triton loads each in
        # the split layout, one 2-byte load per row and group in the loop: not pipelined)
        if not GLU:
            n3 = n0 + tl.arange(0, BLOCK_N)[:, None, None]
        s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, n3 * scale_row_stride + gs,
                         _rows_ok(n3, N, EVEN_N) & g_ok, SCALE_DQ)
        t0, t1, t2, t3 = _rows_of(w, RPT)
        s0, s1, s2, s3 = _rows_of(s, RPT)
        acc0 += _tile_part(t0, x0, x1, x2, x3, x4, x5, x6, x7, xs, s0, val_ptr, z_ptr, rows0, gs,
                           _rows_ok(rows0, N, EVEN_N) & g_ok, zero_row_stride, KIND, PRMT, BOOK, XQ8)
        if RPT >= 2:
            acc1 += _tile_part(t1, x0, x1, x2, x3, x4, x5, x6, x7, xs, s1, val_ptr, z_ptr, rows0 + step, gs,
                               _rows_ok(rows0 + step, N, EVEN_N) & g_ok, zero_row_stride, KIND, PRMT, BOOK, XQ8)
        if RPT == 4:
            acc2 += _tile_part(t2, x0, x1, x2, x3, x4, x5, x6, x7, xs, s2, val_ptr, z_ptr, rows0 + 2, gs,
                               _rows_ok(rows0 + 2, N, EVEN_N) & g_ok, zero_row_stride, KIND, PRMT, BOOK, XQ8)
            acc3 += _tile_part(t3, x0, x1, x2, x3, x4, x5, x6, x7, xs, s3, val_ptr, z_ptr, rows0 + 3, gs,
                               _rows_ok(rows0 + 3, N, EVEN_N) & g_ok, zero_row_stride, KIND, PRMT, BOOK, XQ8)
    k_inputs = n_groups * GROUP_W * 8
    rn = n0 + ri
    if GLU:
        _glu_out(acc0, acc1, rn, n_half, squares, b_ptr, y_ptr, k_inputs, eps, HAS_BIAS, NORM_IN)
        return
    sq, h0 = _tile_out(acc0, rn, N, squares, b_ptr, y_ptr, nw_ptr, h_ptr, k_inputs, eps, HAS_BIAS, NORM_IN,
                       NORM_OUT)
    if RPT >= 2:
        sq1, h1 = _tile_out(acc1, rn + 1, N, squares, b_ptr, y_ptr, nw_ptr, h_ptr, k_inputs, eps, HAS_BIAS,
                            NORM_IN, NORM_OUT)
        sq += sq1
        if Q8_OUT:  # the launcher asks for RPT 2 and whole 16-row tiles
            _store_int8_words(h0, h1, n0, q_out_ptr, qs_out_ptr, R)
    if RPT == 4:
        sq2, _ = _tile_out(acc2, rn + 2, N, squares, b_ptr, y_ptr, nw_ptr, h_ptr, k_inputs, eps, HAS_BIAS, NORM_IN,
                           NORM_OUT)
        sq3, _ = _tile_out(acc3, rn + 3, N, squares, b_ptr, y_ptr, nw_ptr, h_ptr, k_inputs, eps, HAS_BIAS, NORM_IN,
                           NORM_OUT)
        sq += sq2 + sq3
    if NORM_OUT:
        tl.store(sq_out_ptr + n0 // BLOCK_N, sq)


@triton.jit
def _gemv_tma_kernel(
    x_ptr, w_src, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
    sq_in_ptr, n_sq, eps, nw_ptr, h_ptr, sq_out_ptr, xs_ptr, q_out_ptr, qs_out_ptr,
    N, n_half, n_groups, stride_wn, scale_row_stride, group_step, zero_row_stride,
    GROUP_W: tl.constexpr,  # int32 words per group (group / 8); in_features is a whole number of groups
    KIND: tl.constexpr,  # 0 int sym, 1 int asym, 2 codebook
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per tile
    BLOCK_G: tl.constexpr,  # groups per loop iteration
    X_BF16: tl.constexpr,  # x is bf16 (else fp16); x_ptr points at it as int32 pairs
    STAGES: tl.constexpr = 3,
    TMA: tl.constexpr = True,  # w_src is a [out, groups, words] tensor descriptor (Hopper's copy engine)
    PRMT: tl.constexpr = True,  # decode with one PRMT per code (else two integer instructions)
    PERSISTENT: tl.constexpr = False,  # a few programs per SM, each looping over row tiles (one flattened loop)
    WS: tl.constexpr = False,  # Triton's automatic warp specialization of the pipelined loop (loads vs math)
    BOOK: tl.constexpr = 0,  # codebook: 1 NF4, 2 FP4 held in registers; 0 the float32 table in memory
    NORM_IN: tl.constexpr = False,  # x is a norm-weighted row: scale by 1/rms from the producer's partials
    SQ_BLOCK: tl.constexpr = 1,  # a power of two >= n_sq
    NORM_OUT: tl.constexpr = False,  # also write the next norm's weighted row and this tile's sum of squares
    EVEN_G: tl.constexpr = False,  # n_groups is a multiple of BLOCK_G: no group masks in the loop
    XVEC: tl.constexpr = False,  # load a word's 8 activations as one 16-byte vector
    RPT: tl.constexpr = 1,  # rows per thread at each word position (1, 2, 4): activations unpacked once for them
    XQ8: tl.constexpr = False,  # int codes: each word's activations rounded to int8 (W4A8), integer dot products
    EVEN_N: tl.constexpr = False,  # N is a multiple of BLOCK_N: no row masks on the scale loads in the loop
    XIN8: tl.constexpr = False,  # x is int8 words + scales written by a Q8_OUT GEMV (with XQ8: no rounding here)
    Q8_OUT: tl.constexpr = False,  # with NORM_OUT: also write h as int8 words + scales for an XIN8 GEMV
    GLU: tl.constexpr = False,  # stacked gate/up rows (n_half each): write silu(gate) * up [n_half]
):
    """One row, round 5: the weight tiles ``[rows, groups, words]`` arrive by TMA (``TMA``: the copy engine
    writes them to shared memory, Triton's pipelining keeps ``STAGES`` in flight, and no thread spends
    instructions on addresses). Int codes become the exact float32 ``128 + q`` in one PRMT each (``PRMT``); per
    word and row ``sum_c (128 + q_c) x_c - (128 + zero) sum_c x_c`` -- 8 FMAs and one more, then the group
    scale. NF4/FP4 codes are looked up in a register-held table (``BOOK``) and enter the same 8 FMAs. The
    activation pairs (and their sum) are converted once per thread for all the rows it holds. Groups of at
    least 32 codes (16-byte TMA boxes) and rows of whole groups.

    ``PERSISTENT``: the grid is a few programs per SM and each walks the row tiles ``pid, pid + programs, ...``;
    Triton flattens the tile and group loops into one pipelined loop, so the next tile's first weights are in
    flight while this tile finishes (short rows, like 4096 inputs = 4 iterations, otherwise spend most of their
    time filling the pipeline)."""
    if PERSISTENT:
        n_tiles = tl.cdiv(n_half, BLOCK_N // 2) if GLU else tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES, flatten=True,
                             warp_specialize=WS):
            _gemv_tma_tile(x_ptr, w_src, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
                           sq_in_ptr, n_sq, eps, nw_ptr, h_ptr, sq_out_ptr, xs_ptr, q_out_ptr, qs_out_ptr,
                           tile * (BLOCK_N // 2 if GLU else BLOCK_N), N, n_half, n_groups, stride_wn,
                           scale_row_stride, group_step,
                           zero_row_stride, GROUP_W, KIND, SCALE_DQ, HAS_BIAS, BLOCK_N, BLOCK_G, X_BF16, 1, TMA,
                           PRMT, False, BOOK, NORM_IN, SQ_BLOCK, NORM_OUT, EVEN_G, XVEC, RPT, XQ8, EVEN_N,
                           XIN8, Q8_OUT, GLU)
    else:
        _gemv_tma_tile(x_ptr, w_src, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
                       sq_in_ptr, n_sq, eps, nw_ptr, h_ptr, sq_out_ptr, xs_ptr, q_out_ptr, qs_out_ptr,
                       tl.program_id(0) * (BLOCK_N // 2 if GLU else BLOCK_N), N, n_half, n_groups, stride_wn,
                       scale_row_stride, group_step,
                       zero_row_stride, GROUP_W, KIND, SCALE_DQ, HAS_BIAS, BLOCK_N, BLOCK_G, X_BF16, STAGES, TMA,
                       PRMT, WS, BOOK, NORM_IN, SQ_BLOCK, NORM_OUT, EVEN_G, XVEC, RPT, XQ8, EVEN_N, XIN8,
                       Q8_OUT, GLU)


# The decodes' inline PTX, generated (and tested on the CPU) in holdall.kernels.ptx
_ASM_NIB_BF16 = tl.constexpr(ptx.nibbles_asm(True))
_ASM_NIB_F16 = tl.constexpr(ptx.nibbles_asm(False))
_ASM_NF4_BF16 = tl.constexpr(ptx.table_asm("nf4", True))
_ASM_NF4_F16 = tl.constexpr(ptx.table_asm("nf4", False))
_ASM_FP4_BF16 = tl.constexpr(ptx.table_asm("fp4", True))
_ASM_FP4_F16 = tl.constexpr(ptx.table_asm("fp4", False))
#: codebook name -> the ``BOOK`` constexpr of the tensor-core kernel's register-table decode
_BOOKS = {"nf4": 1, "fp4": 2}


@triton.jit
def _nibbles16(wb, X_BF16: tl.constexpr):
    """Both codes of every byte of ``wb`` (uint8) as the exact 16-bit floats ``MAG + q`` (bf16 ``128 + q``, fp16
    ``1024 + q``), two codes per instruction (:func:`holdall.kernels.ptx.nibbles_asm`), returned as int16 bits
    ``(high nibbles, low nibbles)``."""
    if X_BF16:
        hi, lo = tl.inline_asm_elementwise(_ASM_NIB_BF16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
    else:
        hi, lo = tl.inline_asm_elementwise(_ASM_NIB_F16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
    return hi, lo


@triton.jit
def _table16(wb, X_BF16: tl.constexpr, BOOK: tl.constexpr):
    """Both codes of every byte of ``wb`` (uint8) looked up in the codebook ``BOOK`` (1 NF4, 2 FP4) held in
    registers (:func:`holdall.kernels.ptx.table_asm`), as 16-bit float bits ``(high nibbles, low nibbles)``."""
    if BOOK == 1:
        if X_BF16:
            hi, lo = tl.inline_asm_elementwise(_ASM_NF4_BF16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
        else:
            hi, lo = tl.inline_asm_elementwise(_ASM_NF4_F16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
    else:
        if X_BF16:
            hi, lo = tl.inline_asm_elementwise(_ASM_FP4_BF16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
        else:
            hi, lo = tl.inline_asm_elementwise(_ASM_FP4_F16, "=r,=r,=r,=r,r", [wb], (tl.int16, tl.int16), True, 4)
    return hi, lo


@triton.jit
def _tile_setup(M, N, n_groups, groups_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A split-K tensor-core program's place: its tile (``pid_n``) and split (``pid_k``), weight rows ``rn`` and
    input rows ``rm`` with their masks, and its groups ``start..stop``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    start = pid_k * groups_per_split
    return pid_n, pid_k, rn, rn < N, rm, rm < M, start, tl.minimum(start + groups_per_split, n_groups)


@triton.jit
def _gemm2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, val16_ptr, b_ptr, y_ptr,
    M, N, K, n_groups, stride_xm, stride_ym, stride_wn, scale_row_stride, group_step, zero_row_stride,
    groups_per_split, out_ptr, sem_ptr,
    GROUP: tl.constexpr,  # codes per group = codes per iteration
    KIND: tl.constexpr,
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: write float32 partials [SPLIT_K, M, N] to y_ptr for _splitk_sum
    BLOCK_M: tl.constexpr,  # input rows (all of them: M <= BLOCK_M)
    BLOCK_N: tl.constexpr,  # weight rows per program
    X_BF16: tl.constexpr,
    FOLD: tl.constexpr = True,  # scale (and zero) folded into the decoded weight: one chained dot
    STAGES: tl.constexpr = 1,  # Triton's software pipelining of the loads (it turns table lookups into copies)
    PREFETCH: tl.constexpr = True,  # load the next group's weight and activations into registers first
    PACKED: tl.constexpr = False,  # without FOLD: int codes two per PTX instruction, codebooks from registers
    SEM: tl.constexpr = False,  # split-K: the last program of a tile sums the partials (no second launch)
    BOOK: tl.constexpr = 0,  # codebook with PACKED: 1 NF4, 2 FP4 looked up in registers (_table16)
):
    """1..64 rows on tensor cores with the weight as the *left* operand (``y^T = W x^T``): the weight tile
    (64..256 rows) fills the MMA's M dimension and the few input rows its N, instead of padding 2..16 input
    rows to the 64-row MMA of Hopper. Bytes are decoded into natural input order (high nibble, low nibble
    interleaved), one group per iteration.

    ``FOLD`` (default): each code becomes ``(q - zero) * scale`` (int: ``1 + q/16`` from one shift and one
    AND-OR, then one float32 FMA with per-row constants ``16 s`` and ``-(16 + zero) s``; codebook:
    ``value * scale``) rounded to the activation dtype, and the dot accumulates straight into the output tile,
    so consecutive MMAs overlap the next group's decode. Rounding the scaled weight to bf16 costs ~2**-9
    relative per weight, what bitsandbytes and Marlin accept too.
    Without ``FOLD``: int codes enter the dot as the exact ``MAG + q`` (bf16 128 + q / fp16 1024 + q), the
    group scale multiplies the float32 partial, and ``(MAG + zero) * sum(x)`` is taken off once per group.
    ``PACKED`` builds those 16-bit floats two per instruction in inline PTX (:func:`_nibbles16`); for codebooks
    it looks the values up in a register-held table (:func:`_table16`, ``BOOK``) instead of memory.

    Split-K writes float32 partials ``[SPLIT_K, M, N]`` to ``y_ptr``. Without ``SEM`` a second launch sums them
    (:func:`_splitk_sum`); with ``SEM`` each program then counts itself in on its tile's counter
    (``sem_ptr[pid_n]``, zero before the launch) and the last one in sums the partials in the fixed order
    ``0..SPLIT_K-1`` (deterministic), writes ``out_ptr`` and puts the counter back to zero.
    """
    HALF: tl.constexpr = GROUP // 2  # bytes per group in a weight row
    pid_n, pid_k, rn, n_ok, rm, m_ok, start, stop = _tile_setup(M, N, n_groups, groups_per_split, BLOCK_M, BLOCK_N)
    rb = tl.arange(0, HALF)
    rk = tl.arange(0, GROUP)
    dtype = x_ptr.dtype.element_ty
    MAG_BITS: tl.constexpr = 0x4300 if X_BF16 else 0x6400  # bf16 128.0 (7 mantissa bits) / fp16 1024.0 (10)
    MAG: tl.constexpr = 128.0 if X_BF16 else 1024.0
    TABLE: tl.constexpr = 0 if X_BF16 else 16  # the 16-bit table: bf16 bits, then fp16 bits
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    w_rows = w_ptr + rn[:, None] * stride_wn  # [BN, 1] uint8
    x_cols = x_ptr + rm[None, :] * stride_xm  # [1, BM]
    if PREFETCH:  # software pipelining by hand: the next group's loads are issued before this group's math
        kb = start * HALF + rb
        wb_next = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & (kb < K // 2)[None, :] & (start < stop),
                          other=0)
        k = start * GROUP + rk
        xt_next = tl.load(x_cols + k[:, None], mask=(k < K)[:, None] & m_ok[None, :] & (start < stop), other=0.0)
    for g in tl.range(start, stop, num_stages=STAGES):
        if PREFETCH:
            wb = wb_next
            xt = xt_next
            kb = (g + 1) * HALF + rb
            wb_next = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & (kb < K // 2)[None, :] & (g + 1 < stop),
                              other=0)
            k = (g + 1) * GROUP + rk
            xt_next = tl.load(x_cols + k[:, None], mask=(k < K)[:, None] & m_ok[None, :] & (g + 1 < stop),
                              other=0.0)
        else:
            kb = g * HALF + rb
            wb = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & (kb < K // 2)[None, :], other=0)  # [BN, HALF]
            k = g * GROUP + rk
            xt = tl.load(x_cols + k[:, None], mask=(k < K)[:, None] & m_ok[None, :], other=0.0)  # [GROUP, BM]
        s = _group_scale(s_ptr, sabs_ptr, soff_ptr, dmap_ptr, rn * scale_row_stride + g * group_step, n_ok,
                         SCALE_DQ)  # [BN] float32
        if FOLD:
            if KIND == 2:
                v_hi = tl.load(val_ptr + (wb >> 4).to(tl.int32))
                v_lo = tl.load(val_ptr + (wb & 0xF).to(tl.int32))
                a = (tl.interleave(v_hi, v_lo) * s[:, None]).to(dtype)
            else:
                w32 = wb.to(tl.int32)
                v_hi = (((w32 << 15) & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q/16
                v_lo = (((w32 << 19) & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
                if KIND == 1:
                    zero = _group_zero(z_ptr, rn, g * group_step, zero_row_stride, n_ok).to(tl.float32)
                else:
                    zero = 8.0
                mul = 16.0 * s  # (1 + q/16) * 16 s - (16 + zero) s = (q - zero) s
                add = -(16.0 + zero) * s
                a = (tl.interleave(v_hi, v_lo) * mul[:, None] + add[:, None]).to(dtype)
            acc = tl.dot(a, xt, acc)
        else:
            if PACKED and KIND != 2:
                hi, lo = _nibbles16(wb, X_BF16)
            elif PACKED:
                hi, lo = _table16(wb, X_BF16, BOOK)
            else:
                hi = (wb >> 4).to(tl.int16)
                lo = (wb & 0xF).to(tl.int16)
            if PACKED:
                a = tl.interleave(hi, lo)
            elif KIND == 2:
                a = tl.interleave(tl.load(val16_ptr + TABLE + hi), tl.load(val16_ptr + TABLE + lo))
            else:
                a = tl.interleave(hi | MAG_BITS, lo | MAG_BITS)
            part = tl.dot(a.to(dtype, bitcast=True), xt)  # [BN, BM] float32
            if KIND == 1:
                zero = _group_zero(z_ptr, rn, g * group_step, zero_row_stride, n_ok).to(tl.float32)  # [BN]
                part -= (MAG + zero)[:, None] * tl.sum(xt.to(tl.float32), axis=0)[None, :]
            elif KIND == 0:
                part -= (MAG + 8.0) * tl.sum(xt.to(tl.float32), axis=0)[None, :]
            acc += part * s[:, None]
    _splitk_store(acc, y_ptr, out_ptr, b_ptr, sem_ptr, rm, rn, m_ok, n_ok, pid_n, pid_k, M, N, stride_ym,
                  SPLIT_K, HAS_BIAS, SEM)


_ASM_FOLD = {(book, bf16): tl.constexpr(ptx.fold16_asm({0: None, 1: "nf4", 2: "fp4"}[book], bf16))
             for book in (0, 1, 2) for bf16 in (True, False)}
_ASM_FOLD_INT_BF16, _ASM_FOLD_INT_F16 = _ASM_FOLD[0, True], _ASM_FOLD[0, False]
_ASM_FOLD_NF4_BF16, _ASM_FOLD_NF4_F16 = _ASM_FOLD[1, True], _ASM_FOLD[1, False]
_ASM_FOLD_FP4_BF16, _ASM_FOLD_FP4_F16 = _ASM_FOLD[2, True], _ASM_FOLD[2, False]
_FOLD_IO = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,h,h")  # 8 16-bit codes out; the word, scale, offset in


@triton.jit
def _fold16(w, s16, c16, BOOK: tl.constexpr, X_BF16: tl.constexpr):
    """The 8 codes of every int32 word of ``w``, scaled, as 16-bit float bits (int16) in input order
    (:func:`holdall.kernels.ptx.fold16_asm`): ``s16`` the scale and ``c16`` ``-(MAG + zero)`` as 16-bit bits of
    the activation dtype, shaped like ``w``; ``BOOK`` 0 int codes, 1 NF4, 2 FP4."""
    return tl.inline_asm_elementwise(
        (_ASM_FOLD_INT_BF16 if X_BF16 else _ASM_FOLD_INT_F16) if BOOK == 0 else
        (_ASM_FOLD_NF4_BF16 if X_BF16 else _ASM_FOLD_NF4_F16) if BOOK == 1 else
        (_ASM_FOLD_FP4_BF16 if X_BF16 else _ASM_FOLD_FP4_F16), _FOLD_IO, [w, s16, c16], (tl.int16,) * 8, True, 1)


@triton.jit
def _splitk_store(acc, y_ptr, out_ptr, b_ptr, sem_ptr, rm, rn, m_ok, n_ok, pid_n, pid_k, M, N, stride_ym,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SEM: tl.constexpr):
    """Store a ``[rows, M]`` float32 tile of ``y^T``: the output itself (``SPLIT_K`` 1), or split ``pid_k``'s
    partial to ``y_ptr [SPLIT_K, M, N]``; with ``SEM`` the tile's last program in (counter ``sem_ptr[pid_n]``,
    zero before the launch) sums the partials in the fixed order ``0..SPLIT_K-1``, adds the bias, writes
    ``out_ptr`` and puts the counter back to zero."""
    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(y_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=out_ok, cache_modifier=".cg")
        if SEM:
            tl.debug_barrier()  # every thread's partial is stored before the counter says so
            arrived = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:  # the last program of this tile: every partial is in
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for k in tl.static_range(SPLIT_K):  # fixed order: the same sum whichever program is last
                    total += tl.load(y_ptr + (k * M + rm[None, :]) * N + rn[:, None], mask=out_ok, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptr + rm[None, :] * stride_ym + rn[:, None], total.to(out_ptr.dtype.element_ty),
                         mask=out_ok)
                tl.atomic_xchg(sem_ptr + pid_n, 0)  # ready for the next launch


@triton.jit
def _fragment_order(v, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Reorder the columns of ``v [ROWS, GROUP]`` (a group of inputs in natural order) into the order in which
    the tensor cores' register fragments of the left operand hold them: column ``16 i + 8 h + 2 c + e`` takes
    input ``(GROUP / 4) c + 4 i + 2 h + e``. A 16-deep MMA step gives thread ``c`` of each quad inputs
    ``2c, 2c+1, 2c+8, 2c+9``; in this order they are 4 codes of 2 adjacent bytes, and over the group one
    contiguous quarter of the row's bytes -- so each thread loads its codes as whole words and no decoded
    weight goes through shared memory. The activations take the same order, so the dot is unchanged."""
    v = tl.reshape(v, (ROWS, 4, GROUP // 16, 2, 2))
    return tl.reshape(tl.permute(v, (0, 2, 3, 1, 4)), (ROWS, GROUP))


@triton.jit
def _gemm3_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sabs_ptr, soff_ptr, dmap_ptr, val_ptr, b_ptr, y_ptr,
    M, N, n_groups, stride_xm, stride_ym, stride_wn, scale_row_stride, group_step, zero_row_stride,
    groups_per_split, out_ptr, sem_ptr,
    GROUP: tl.constexpr,  # codes per group = inputs per iteration (rows are whole groups)
    KIND: tl.constexpr,
    SCALE_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: float32 partials [SPLIT_K, M, N] in y_ptr (summed by SEM or _splitk_sum)
    BLOCK_M: tl.constexpr,  # input rows (all of them: M <= BLOCK_M)
    BLOCK_N: tl.constexpr,  # weight rows per program
    X_BF16: tl.constexpr,
    STAGES: tl.constexpr = 3,  # Triton's software pipelining of the word and activation loads
    PRMT: tl.constexpr = True,  # int codes by inline PTX (one PRMT each); False: plain Triton bit operations
    BOOK: tl.constexpr = 1,  # codebook values: 1 NF4 / 2 FP4 from registers (inline PTX), 0 the memory table
    XREG: tl.constexpr = True,  # activations loaded in input order and reordered in registers (else gathered)
    SEM: tl.constexpr = False,  # split-K summed by each tile's last program (no second launch)
    FOLD16: tl.constexpr = False,  # scale in 16-bit pairs inside the PTX decode (int: with PRMT; codebook: BOOK > 0)
):
    """2..64 rows on tensor cores, round 6: the weight as the MMA's left operand (as ``_gemm2_kernel``), its
    int32 words loaded whole and decoded in the MMA's own register layout.

    A group's inputs are put in fragment order (:func:`_fragment_order`) on both sides, so every thread's codes
    are whole words it loads itself (16-byte loads, pipelined ``STAGES`` deep) and the decoded tile feeds the
    MMA from registers with no shared-memory round trip (``_gemm2_kernel`` reads its bytes one by one and waits
    for each MMA). With ``FOLD16`` the codes become scaled 16-bit weights inside the PTX, two per instruction
    (:func:`_fold16`: exact ``MAG + q`` pairs minus ``MAG + zero``, or register-table values, times the scale
    rounded to the activation dtype); without it each code becomes the float32 ``128 + q`` by one PRMT (or a
    table value), one FMA folds the scale in (``(128 + q) s - (128 + zero) s``, or ``value * s``) and a
    conversion rounds it. Either way the weight enters one chained dot (the scaled weight rounded once, ~2**-9
    relative in bf16, as in ``FOLD``). The group scales (and zero points) are loaded an iteration ahead.
    """
    GW: tl.constexpr = GROUP // 8  # int32 words per group of a row
    pid_n, pid_k, rn, n_ok, rm, m_ok, start, stop = _tile_setup(M, N, n_groups, groups_per_split, BLOCK_M, BLOCK_N)
    rw = tl.arange(0, GW)
    kk = tl.arange(0, GROUP)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    w_rows = w_ptr + rn[:, None] * stride_wn  # [BN, 1] int32
    s_next, nested_next = _scale_raw(s_ptr, sabs_ptr, rn * scale_row_stride + start * group_step,
                                     n_ok & (start < stop), SCALE_DQ)
    if KIND == 1:
        z_next = _zero_byte(z_ptr, rn, start * group_step, zero_row_stride, n_ok & (start < stop))
    for g in tl.range(start, stop, num_stages=STAGES):
        w = tl.load(w_rows + (g * GW + rw)[None, :], mask=n_ok[:, None], other=0)  # [BN, GW]
        if XREG:
            xn = tl.load(x_ptr + rm[:, None] * stride_xm + (g * GROUP + kk)[None, :], mask=m_ok[:, None], other=0.0)
            xt = tl.trans(_fragment_order(xn, BLOCK_M, GROUP))  # [GROUP, BM]
        else:  # gathered straight into fragment order (4-byte loads)
            order = (GROUP // 4) * ((kk // 2) % 4) + 4 * (kk // 16) + 2 * ((kk // 8) % 2) + kk % 2
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (g * GROUP + order)[:, None], mask=m_ok[None, :],
                         other=0.0)
        s = _scale_value(s_next, nested_next, soff_ptr, dmap_ptr, SCALE_DQ)  # [BN] float32
        s_next, nested_next = _scale_raw(s_ptr, sabs_ptr, rn * scale_row_stride + (g + 1) * group_step,
                                         n_ok & (g + 1 < stop), SCALE_DQ)
        if KIND == 1:
            zero = _zero_nibble(z_next, g * group_step).to(tl.float32)
            z_next = _zero_byte(z_ptr, rn, (g + 1) * group_step, zero_row_stride, n_ok & (g + 1 < stop))
        else:
            zero = s * 0.0 + 8.0  # derived from s, not a constant: a splat here makes Triton re-lay the decode out
        if FOLD16 and (PRMT if KIND != 2 else BOOK != 0):  # scaled in 16-bit pairs inside the PTX decode
            s16 = tl.broadcast_to(s.to(dtype).to(tl.int16, bitcast=True)[:, None], (BLOCK_N, GW))
            MAG: tl.constexpr = 128.0 if X_BF16 else 1024.0
            c16 = tl.broadcast_to((-(MAG + zero)).to(dtype).to(tl.int16, bitcast=True)[:, None], (BLOCK_N, GW))
            h0, h1, h2, h3, h4, h5, h6, h7 = _fold16(w, s16, c16, BOOK if KIND == 2 else 0, X_BF16)
            a0, a1, a2, a3 = h0.to(dtype, bitcast=True), h1.to(dtype, bitcast=True), h2.to(dtype, bitcast=True), \
                h3.to(dtype, bitcast=True)
            a4, a5, a6, a7 = h4.to(dtype, bitcast=True), h5.to(dtype, bitcast=True), h6.to(dtype, bitcast=True), \
                h7.to(dtype, bitcast=True)
        else:  # float32 decode, one FMA per code, rounded to the activation dtype
            if KIND == 2:
                c0, c1, c2, c3, c4, c5, c6, c7 = _book_f32(w, val_ptr, BOOK)
                add = tl.zeros_like(s)[:, None]
            else:
                c0, c1, c2, c3, c4, c5, c6, c7 = _codes_f32(w, PRMT)
                add = (-(128.0 + zero) * s)[:, None]
            mul = s[:, None]
            a0, a1, a2, a3 = (c0 * mul + add).to(dtype), (c1 * mul + add).to(dtype), (c2 * mul + add).to(dtype), \
                (c3 * mul + add).to(dtype)
            a4, a5, a6, a7 = (c4 * mul + add).to(dtype), (c5 * mul + add).to(dtype), (c6 * mul + add).to(dtype), \
                (c7 * mul + add).to(dtype)
        # join's new axis is the last, so the outermost join picks code bit 0: [BN, GW, 2, 2, 2] = code 4a+2b+c
        a = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7)))
        a = _fragment_order(tl.reshape(a, (BLOCK_N, GROUP)), BLOCK_N, GROUP)  # [BN, GROUP]
        acc = tl.dot(a, xt, acc)
    _splitk_store(acc, y_ptr, out_ptr, b_ptr, sem_ptr, rm, rn, m_ok, n_ok, pid_n, pid_k, M, N, stride_ym,
                  SPLIT_K, HAS_BIAS, SEM)


# --- launch configuration -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    """Hopper or newer and a Triton that builds host tensor descriptors."""
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def gemv_config(p: Plan, sms: int, tma: bool = False, int8_activations: bool = False, gluon: bool = False,
                chained: bool = False) -> dict:
    """Launch configuration for one row, from the sweeps on an H200 (bench/gpu_kernels.py --sweep;
    BENCHMARKS.md, rounds 5, 8 and 10). ``tma``: the device has Hopper's tensor memory accelerator and the words
    are 16-byte aligned. ``int8_activations``: the caller wants the int codes multiplied by int8-rounded
    activations (``XQ8``, W4A8); formats the option cannot take get their float configuration (the caller
    rounds the activations itself, :func:`holdall.kernels.dispatch.project_int8`). ``gluon``: the Gluon GEMV
    can run here (:func:`holdall.kernels.gluon_wq4.available`): it takes the layers it can
    (:func:`holdall.kernels.gluon_wq4.why_not`: int symmetric codes, float or int8 activations), round 10;
    ``chained``: a link of a decode step, where no kernel writes the weights (the Gluon GEMV then launches with
    programmatic dependent launch and reads weights before waiting, round 11).

    With TMA and rows of whole groups, every format takes the round-5 kernel (``VARIANT tma``). Its best tiling
    depends on the row length (us at 4096x11008 / 11008x4096 / 4096x4096, round 8):
    * int symmetric: two rows per thread at each word position (``RPT``), 16-byte activation loads, no masks
      where the tiles divide the matrix; long rows (>= 8192 inputs) 16 rows x 128 words on 8 warps (13.6
      against round 5's 14.7-17.4), shorter rows 32 x 64 words when that makes at least one program per SM,
      else 16 x 64 (11.9 vs 15.4, 6.6 vs 7.8); with ``XQ8`` the same tiles (12.0, 9.6, 6.3);
    * int asymmetric: 16 x 128 words, 8 warps on long rows (17.5 vs 20.2), else 16 x 64, 4 stages (17.2 vs
      18.9, 7.8 vs 8.7; two rows per thread measured no better); with ``XQ8`` the symmetric kernel's options
      and tiling (14.2, 11.2, 7.2);
    * NF4/FP4 (register table): two rows per thread, 64 words per tile, 32 rows where that gives a program per
      SM on short rows, else 16 (NF4 + double quant 23.8 / 20.8 / 9.6 against round 5's 26.2 / 26.4 / 11.2;
      NF4 20.2 / 19.0 / 9.0 against 19.9 / 22.6 / 9.9).
    The same tilings with programs looping over tiles (``PROGRAMS_PER_SM``) were slower everywhere.
    Without TMA or with a partial last group: int codes take the first-round pairs kernel (8 rows x 128 words,
    Triton's pipelining 3 deep plus a register prefetch); codebooks the ``[rows, groups, words, 8 codes]``
    kernel with the 16-value table (all lanes of a warp on one 64-byte line), unpipelined (pipelining turns
    the table lookups into asynchronous copies, 15x slower). The round-2 ``v2`` kernel (half the instructions
    per code) measured 2.6x *slower*; it is kept, tested, not used. Round 10: where the Gluon kernel can run
    (``gluon``), int symmetric codes take it (:func:`holdall.kernels.gluon_wq4.gemv_config`) instead of all this;
    round 14: codebooks the tensor-core GEMV (:func:`holdall.kernels.gluon_mma.gemv_config`).
    """
    if gluon:
        from . import gluon_mma, gluon_wq4  # imported where used: they build on this module's elementwise helpers

        if gluon_wq4.why_not(p, int8_activations) is None:
            return gluon_wq4.gemv_config(p, int8_activations, chained)
        mma = None if int8_activations else gluon_mma.gemv_config(p, sms, chained)
        if mma is not None:  # round 14: codebooks on tensor cores
            return mma
    group_w = p.group // CODES_PER_WORD
    long_rows = p.in_features >= 8192
    if p.kind == 2:
        if tma and p.in_features % p.group == 0 and p.codebook in _BOOKS:
            block_n = 32 if triton.cdiv(p.out_features, 32) >= sms and not long_rows else 16
            return {"VARIANT": "tma", "BLOCK_N": block_n, "BLOCK_G": max(1, 64 // group_w), "STAGES": 3,
                    "num_warps": 4, "RPT": 2, "XVEC": True, "EVEN_N": p.out_features % block_n == 0}
        return {"BLOCK_N": 8, "BLOCK_G": max(1, 64 // group_w), "num_warps": 4, "STAGES": 1, "VARIANT": "4d",
                "LUT16": True}
    if tma and p.in_features % p.group == 0:
        if p.kind == 1 and not int8_activations:  # asymmetric (zero points loaded per row and group)
            if long_rows:
                return {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": max(1, 128 // group_w), "STAGES": 3,
                        "num_warps": 8}
            return {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": max(1, 64 // group_w), "STAGES": 4, "num_warps": 4}
        if long_rows:  # 16 rows x 128 words on 8 warps (float 13.6 us, int8 12.0; 32 rows 12.9-22.7 with int8)
            block_n, words, warps = 16, 128, 8
        else:
            block_n, words, warps = (32 if triton.cdiv(p.out_features, 32) >= sms else 16), 64, 4
        block_g = max(1, words // group_w)
        return {"VARIANT": "tma", "BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": 3, "num_warps": warps,
                "RPT": 2, "XVEC": True, "EVEN_N": p.out_features % block_n == 0,
                "EVEN_G": (p.in_features // p.group) % block_g == 0, "XQ8": int8_activations}
    return {"BLOCK_N": 8, "BLOCK_G": max(1, 128 // group_w), "num_warps": 4, "STAGES": 3, "PREFETCH": True}


def _split_k(p: Plan, tiles: int, sms: int, programs_per_sm: float, min_groups: int = 4) -> int:
    """Smallest power-of-two split of the groups that gives ``programs_per_sm`` programs per SM (at most 16,
    and at least ``min_groups`` groups per split)."""
    n_groups = triton.cdiv(p.in_features, p.group)
    split_k = 1
    while split_k < 16 and tiles * split_k < programs_per_sm * sms and n_groups >= 2 * min_groups * split_k:
        split_k *= 2
    return split_k


def gemm_config(p: Plan, m: int, sms: int) -> dict:
    """Launch configuration for 2..64 rows, from the sweeps on an H200 (bench/gpu_kernels.py --sweep;
    BENCHMARKS.md).

    Rows of whole groups (round 6): the fragment-order kernel (``VARIANT v3``), 128 weight rows and 4 warps per
    program, 3-stage pipelining, split-K summed by each tile's last program. It is latency-bound per program,
    so the split is the smallest power of two giving ~1.9 programs per SM up to 16 rows (4096x11008: 8 splits,
    16.7 us at 4 rows against 56.0 unsplit) and ~1 above, where the float32 partials of 64 rows cost more
    (11008x4096 at 64 rows: 2 splits 31.5 us, 4: 34.6, 8: 43.6), keeping at least 8 groups per split there
    (4096x4096: 4 splits 16.9 us, 8: 17.5; 4096x11008: 8 splits 30.0, 4: 33.3). Every format scales in 16-bit
    pairs inside the PTX decode (``FOLD16``; against the float32 FMA at 4096x11008 x 4 rows: int4 asym 14.8 vs
    16.7 us, sym 14.9 vs 16.7, NF4 + double quant 25.4 vs 27.6).

    Otherwise (a partial last group) the round-2/4 ``v2`` kernel: it is latency-bound per program, so split-K buys
    parallelism: ~3.5 programs per SM up to 16 rows, ~2 above (where the float32 partials of split-K cost more). Int
    codes, Triton's pipelining 3 deep: up to 16 rows the exact ``128 + q`` weights decoded two codes per instruction
    (``PACKED``) with the partials summed by each tile's last program (``SEM``; round 4, against round 2's folded
    decode + second launch: asym 1.19-1.38x faster, sym 0.99-1.15x); at 64 rows the scale folded into the decoded
    weight (``PACKED`` was 6-38% slower there). Codebooks: 128-row tiles, table values in the activation dtype with
    the scale on the float32 partial (``FOLD=False``); up to 16 rows the table is held in registers (``PACKED`` with
    ``BOOK``, round 4: 1.3x faster) and Triton pipelines the loads; at 64 rows the memory table, loads prefetched by
    hand and Triton's pipelining off (it would turn the table lookups into asynchronous copies).
    """
    block_m = max(16, triton.next_power_of_2(m))
    if p.in_features % p.group == 0:  # round 6: whole groups take the fragment-order kernel
        block_n = 128
        split_k = _split_k(p, triton.cdiv(p.out_features, block_n), sms, 1.9 if m <= 16 else 1.0,
                           min_groups=2 if m <= 16 else 8)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3,
                "STAGES": 3, "SEM": True, "VARIANT": "v3", "FOLD16": True}
    if p.kind == 2:
        block_n = 128
        split_k = _split_k(p, triton.cdiv(p.out_features, block_n), sms, 3.5 if m <= 16 else 1.9)
        if m <= 16 and p.codebook in _BOOKS:  # round 4: the table in registers, so pipelining is allowed again
            return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3,
                    "STAGES": 3, "PREFETCH": False, "FOLD": False, "PACKED": True, "SEM": True, "VARIANT": "v2"}
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 1,
                "STAGES": 1, "PREFETCH": True, "FOLD": False, "VARIANT": "v2"}
    block_n = 64 if m <= 16 else 128
    split_k = _split_k(p, triton.cdiv(p.out_features, block_n), sms, 3.5 if m <= 16 else 1.9)
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3,
              "STAGES": 3, "PREFETCH": False, "FOLD": True, "VARIANT": "v2"}
    if m <= 16:  # round 4: exact 128 + q from the PTX decode, partials summed by each tile's last program
        config.update(FOLD=False, PACKED=True, SEM=True)
    return config


def writes_int8_words(p: Plan, config: dict) -> bool:
    """Whether a one-row launch with ``config`` can also write its ``norm_out`` row as int8 words (``int8_out``):
    its row tiles divide the rows, and each holds whole 8-row words in the layout its epilogue packs -- the TMA
    kernel's two row sub-tiles of 16-row tiles (``RPT`` 2), the Gluon kernel's 8-row multiples. Otherwise
    :func:`holdall.kernels.dispatch.fused_gemv` rounds the row in torch (the same numbers)."""
    block_n = int(config["BLOCK_N"])
    if p.out_features % block_n:
        return False
    if config.get("VARIANT") == "gluon":
        return block_n % 8 == 0
    return config.get("VARIANT") == "tma" and config.get("RPT", 1) == 2 and block_n % 16 == 0


# --- launchers ------------------------------------------------------------------------------------------
def default_gemv_config(ops: Operands, p: Plan, device: torch.device, int8_activations: bool = False,
                        chained: bool = False) -> dict:
    """:func:`gemv_config` for this device (its SM count, TMA when it has it and the words are aligned, the
    Gluon GEMV where it runs unless ``HOLDALL_GLUON=0``; ``chained`` as there)."""
    from . import gluon_wq4

    index = device.index if device.index is not None else torch.cuda.current_device()
    aligned = ops.words.data_ptr() % 16 == 0
    return gemv_config(p, _sm_count(index), _has_tma(index) and aligned, int8_activations,
                       gluon_wq4.enabled() and gluon_wq4.available(index) and aligned, chained)


def gemv(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         config: dict | None = None, norm_in: tuple[torch.Tensor, float] | None = None,
         norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
         x_scales: torch.Tensor | None = None,
         int8_out: tuple[torch.Tensor, torch.Tensor] | None = None, glu: bool = False) -> torch.Tensor:
    """``out [N] = W @ x + b`` for one contiguous row ``x [K]`` (bf16/fp16, 4-byte aligned).

    glu: ``W`` is a gate projection stacked over its up projection (``N = 2 I``); write ``out [I] =
    silu(gate) * up`` instead (rounded as torch rounds ``F.silu(gate) * up`` on the two rounded outputs; TMA
    kernel only, two rows per thread: sub-tile 0 the gate rows, sub-tile 1 their up rows).

    An RMSNorm between two GEMVs, split over their epilogues (only the TMA kernel, ``VARIANT "tma"``):
    norm_out: ``(weight [N], h [N], squares [tiles])``: also write ``h = out * weight`` (``x``'s dtype) and each
        ``BLOCK_N``-row tile's float32 sum of ``out^2`` (``tiles = ceil(N / BLOCK_N)``);
    norm_in: ``(squares, eps)``: ``x`` is such an ``h``; multiply ``W @ x`` by ``rsqrt(sum(squares) / K + eps)``
        before the bias: ``W @ (rms_norm(x0) * weight) + b`` for the producer's output ``x0`` (transformers'
        RMSNorm up to where it rounds).
    int8 activations handed from one GEMV to the next (``XQ8`` configs, TMA kernel): ``int8_out = (words int32
    [N / 4], scales float32 [N / 8])`` also writes ``h`` as the int8 words ``XQ8`` would round it to
    (:func:`holdall.kernels.packed.pack_s8_words`); ``x_scales`` given means ``x`` is such words (int32
    ``[K / 4]``) and these their scales, so this GEMV skips its own rounding.
    """
    cfg = dict(config if config is not None else default_gemv_config(ops, p, x.device))
    block_n = cfg.pop("BLOCK_N")
    variant = cfg.pop("VARIANT", "pairs")
    if variant == "gluon_mma":  # round 12: tensor cores, float activations (int symmetric codes, codebooks)
        from . import gluon_mma

        if x_scales is not None or int8_out is not None:
            raise ValueError("the tensor-core GEMV takes float activations: no int8 words in or out")
        return gluon_mma.gemv(ops, p, x, bias, out, {**cfg, "BLOCK_N": block_n}, norm_in, norm_out, glu)
    if variant == "gluon":  # round 10: explicit layouts (int symmetric codes)
        from . import gluon_wq4

        return gluon_wq4.gemv(ops, p, x, bias, out, {**cfg, "BLOCK_N": block_n}, norm_in, norm_out, glu, x_scales,
                              int8_out)
    if (norm_in is not None or norm_out is not None or x_scales is not None or int8_out is not None or glu) \
            and variant != "tma":
        raise ValueError(f"the {variant!r} GEMV cannot fold in a norm, the gated activation or hand over int8 "
                         "activations; only VARIANTs 'tma' and 'gluon' do (rows of whole groups)")
    if variant == "mma":  # the tensor-core kernel with one input row (padded to the MMA's 16 columns)
        return _gemm2(ops, p, x.view(1, -1), bias, out.view(1, -1), {**cfg, "BLOCK_N": block_n, "BLOCK_M": 16})
    grid = (triton.cdiv(p.out_features, block_n),)
    if variant == "tma":
        return _gemv_tma(ops, p, x, bias, out, block_n, cfg, norm_in, norm_out, x_scales, int8_out, glu)
    if variant == "v2":
        assert block_n in (1, 2, 4), "the v2 GEMV holds 1, 2 or 4 rows per program (BLOCK_N)"
        words_per_tile = cfg["BLOCK_G"] * (p.group // CODES_PER_WORD)
        _gemv2_kernel[(triton.cdiv(p.out_features, block_n),)](
            x.view(torch.int32), ops.words, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap,
            ops.values, bias if bias is not None else ops.scale, out,
            p.out_features, p.in_features // CODES_PER_WORD, triton.cdiv(p.in_features, p.group),
            (p.in_features // CODES_PER_WORD) // words_per_tile, ops.words.stride(0),
            p.scale_row_stride, p.group_step, p.zero_row_stride, 0x3F800000,
            GROUP_W=p.group // CODES_PER_WORD, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=bias is not None,
            ROWS=block_n, X_BF16=x.dtype == torch.bfloat16, **cfg,
        )
        return out
    n_groups = triton.cdiv(p.in_features, p.group)
    has_bias = bias is not None
    if variant != "pairs":
        _gemv4d_kernel[grid](
            x, ops.words, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.pairs, ops.values,
            bias if has_bias else ops.scale, out,
            p.out_features, p.in_features // CODES_PER_WORD, n_groups, ops.words.stride(0),
            p.scale_row_stride, p.group_step, p.zero_row_stride,
            GROUP_W=p.group // CODES_PER_WORD, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=has_bias,
            BLOCK_N=block_n, **cfg,
        )
        return out
    # split-K: each split a whole number of tiles, no empty split; partials summed in a fixed order
    split_k, tile = cfg.pop("SPLIT_K", 1), cfg["BLOCK_G"]
    per_split = triton.cdiv(triton.cdiv(n_groups, split_k), tile) * tile
    split_k = triton.cdiv(n_groups, per_split)
    target = out if split_k == 1 else torch.empty(split_k, p.out_features, device=x.device, dtype=torch.float32)
    _gemv_kernel[(grid[0], split_k)](
        x.view(torch.int32), ops.words, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.pairs,
        bias if has_bias else ops.scale, target,
        p.out_features, p.in_features // CODES_PER_WORD, n_groups, ops.words.stride(0),
        p.scale_row_stride, p.group_step, p.zero_row_stride, per_split,
        GROUP_W=p.group // CODES_PER_WORD, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=has_bias,
        BLOCK_N=block_n, X_BF16=x.dtype == torch.bfloat16, SPLIT_K=split_k, **cfg,
    )
    if split_k > 1:
        block = 256
        _splitk_sum[(triton.cdiv(p.out_features, block),)](
            target, bias if has_bias else target, out, p.out_features, p.out_features,
            SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block,
        )
    return out


def _norm_operands(ops: Operands, p: Plan, tiles: int, norm_in: tuple[torch.Tensor, float] | None,
                   norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> tuple:
    """``(squares in, eps, norm weight, h, squares out)`` for a one-row launch, checked (dummies where unused)."""
    sq_in, eps = norm_in if norm_in is not None else (ops.scale, 0.0)
    if norm_in is not None and (sq_in.dtype != torch.float32 or not sq_in.is_contiguous()):
        raise ValueError("norm_in's partial sums of squares must be a contiguous float32 tensor")
    weight, h, sq_out = norm_out if norm_out is not None else (ops.scale, ops.scale, ops.scale)
    if norm_out is not None and (weight.numel() != p.out_features or h.numel() != p.out_features
                                 or sq_out.numel() < tiles or sq_out.dtype != torch.float32):
        raise ValueError(f"norm_out needs a [{p.out_features}] weight and output row and >= {tiles} float32 "
                         f"partials, got {weight.numel()} / {h.numel()} / {sq_out.numel()} {sq_out.dtype}")
    return sq_in, eps, weight, h, sq_out


def _check_int8_x(p: Plan, x: torch.Tensor, x_scales: torch.Tensor, xq8) -> None:
    """int8 words as a one-row launch's ``x``: an ``XQ8`` config, int32 ``[in / 4]``, float32 scales ``[in / 8]``."""
    if not xq8 or x.dtype != torch.int32 or x.numel() * 4 != p.in_features \
            or x_scales.dtype != torch.float32 or x_scales.numel() * 8 != p.in_features:
        raise ValueError(f"int8 words as x need an XQ8 config, int32 words [{p.in_features // 4}] and float32 "
                         f"scales [{p.in_features // 8}]; got XQ8={xq8}, {x.dtype} [{x.numel()}], "
                         f"{x_scales.dtype} [{x_scales.numel()}]")


def _check_int8_out(p: Plan, q_out: torch.Tensor, qs_out: torch.Tensor) -> None:
    """``int8_out``'s buffers: int32 words ``[out / 4]`` and float32 scales ``[out / 8]``."""
    if q_out.dtype != torch.int32 or q_out.numel() * 4 != p.out_features or qs_out.dtype != torch.float32 \
            or qs_out.numel() * 8 != p.out_features:
        raise ValueError(f"int8_out needs int32 [{p.out_features // 4}] words and float32 "
                         f"[{p.out_features // 8}] scales")


def _gemv_tma(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
              block_n: int, cfg: dict, norm_in: tuple[torch.Tensor, float] | None = None,
              norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              x_scales: torch.Tensor | None = None,
              int8_out: tuple[torch.Tensor, torch.Tensor] | None = None, glu: bool = False) -> torch.Tensor:
    """Launch :func:`_gemv_tma_kernel`: ``in_features`` a whole number of groups (the words are read as
    ``[out, groups, words per group]``)."""
    if p.in_features % p.group:
        raise ValueError(f"the TMA GEMV takes in_features a multiple of the group (in_features {p.in_features}, "
                         f"group {p.group}): use VARIANT 'pairs' (int) or '4d' (codebook)")
    if p.kind == 2 and "BOOK" not in cfg:  # the register table where there is one
        cfg["BOOK"] = _BOOKS.get(p.codebook, 0)
    group_w = p.group // CODES_PER_WORD
    n_groups = p.in_features // p.group
    if cfg.get("EVEN_G") and n_groups % cfg["BLOCK_G"]:
        raise ValueError(f"EVEN_G needs the {n_groups} groups of a row in whole tiles of BLOCK_G {cfg['BLOCK_G']}")
    n_half, box_rows = p.out_features, block_n  # rows a program's output covers; rows per weight box
    if glu:
        n_half, box_rows = p.out_features // 2, block_n // 2
        if p.out_features % 2 or block_n % 2 or norm_out is not None or int8_out is not None:
            raise ValueError("glu needs a stacked [gate; up] layer (even rows), an even BLOCK_N, and no norm_out / "
                             "int8_out (its output is the MLP's inner row)")
        if out.numel() != n_half:
            raise ValueError(f"glu writes silu(gate) * up: out needs {n_half} elements, got {out.numel()}")
        if cfg.get("RPT", 2) != 2:
            raise ValueError(f"glu holds a gate row and its up row per thread (RPT 2), not RPT {cfg['RPT']}")
        cfg["RPT"], cfg["GLU"] = 2, True
    if cfg.get("EVEN_N") and n_half % box_rows:
        raise ValueError(f"EVEN_N needs the {n_half} rows in whole tiles of {box_rows} (BLOCK_N {block_n})")
    if cfg.get("XQ8") and p.kind == 2:
        raise ValueError("XQ8 (int8 activations, integer dot products) takes int codes; codebook values "
                         f"({p.codebook}) are not integers: launch without XQ8")
    if cfg.get("RPT", 1) not in (1, 2, 4) or block_n % cfg.get("RPT", 1):
        raise ValueError(f"RPT (rows per thread) must be 1, 2 or 4 and divide BLOCK_N {block_n}; got {cfg['RPT']}")
    src = ops.words
    if cfg.get("TMA", True):  # built per call (host-side, cheap); a CUDA graph captures it by value
        if TensorDescriptor is None:
            raise RuntimeError(f"Triton {triton.__version__} has no host tensor descriptors "
                               "(triton.tools.tensor_descriptor): upgrade Triton or launch with TMA=False")
        if glu:  # [I, 2, groups, words]: a gate row's up row is I rows on
            stride = ops.words.stride(0)
            src = TensorDescriptor(ops.words, [n_half, 2, n_groups, group_w], [stride, n_half * stride, group_w, 1],
                                   [box_rows, 2, cfg["BLOCK_G"], group_w])
        else:
            src = TensorDescriptor(ops.words, [p.out_features, n_groups, group_w], [ops.words.stride(0), group_w, 1],
                                   [box_rows, cfg["BLOCK_G"], group_w])
    tiles = triton.cdiv(n_half, box_rows)
    sq_in, eps, weight, h, sq_out = _norm_operands(ops, p, tiles, norm_in, norm_out)
    if (cfg.get("XIN8") and x_scales is None) or (cfg.get("Q8_OUT") and int8_out is None):
        raise ValueError("XIN8 / Q8_OUT are set by passing x_scales / int8_out, not in the config")
    if x_scales is not None:  # int8 words from a Q8_OUT GEMV: x is int32 [in / 4], x_scales float32 [in / 8]
        _check_int8_x(p, x, x_scales, cfg.get("XQ8"))
        cfg["XIN8"] = True
    if int8_out is not None:  # h as int8 words too: the even / odd row sub-tiles are each word's two halves
        q_out, qs_out = int8_out
        if norm_out is None or not writes_int8_words(p, {**cfg, "VARIANT": "tma", "BLOCK_N": block_n}):
            raise ValueError("int8_out needs norm_out and a config with RPT 2 and BLOCK_N a multiple of 16 that "
                             f"divides the {p.out_features} rows (got RPT {cfg.get('RPT', 1)}, BLOCK_N {block_n})")
        _check_int8_out(p, q_out, qs_out)
        cfg["Q8_OUT"] = True
    else:
        q_out = qs_out = ops.scale
    per_sm = cfg.pop("PROGRAMS_PER_SM", 0)  # > 0: persistent programs
    grid = (min(tiles, per_sm * _sm_count(x.device.index or 0)),) if per_sm else (tiles,)
    _gemv_tma_kernel[grid](
        x.view(torch.int32), src, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.values,
        bias if bias is not None else ops.scale, out,
        sq_in, sq_in.numel(), float(eps), weight, h, sq_out,
        x_scales if x_scales is not None else ops.scale, q_out, qs_out,
        p.out_features, n_half, n_groups, ops.words.stride(0), p.scale_row_stride, p.group_step, p.zero_row_stride,
        GROUP_W=group_w, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        X_BF16=x.dtype == torch.bfloat16, PERSISTENT=per_sm > 0, NORM_IN=norm_in is not None,
        SQ_BLOCK=triton.next_power_of_2(sq_in.numel()) if norm_in is not None else 1, NORM_OUT=norm_out is not None,
        **cfg,
    )
    return out


def _tensor_core_rows_fit(ops: Operands, x: torch.Tensor, index: int) -> bool:
    """The Gluon tensor-core GEMV can run here: Gluon on this GPU, 16-byte aligned words, activation rows readable
    as int32 pairs (even row stride and offset)."""
    from . import gluon_wq4

    return (gluon_wq4.enabled() and gluon_wq4.available(index) and ops.words.data_ptr() % 16 == 0
            and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0
            and x.dtype in (torch.bfloat16, torch.float16))


def gemm(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         config: dict | None = None) -> torch.Tensor:
    """``out [M, N] = x @ W^T + b`` for ``x [M, K]`` (rows contiguous, bf16/fp16), M small."""
    m = x.shape[0]
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if config is None and _tensor_core_rows_fit(ops, x, index):  # rounds 12-13: 2..8 (codebooks 2..16) rows
        from . import gluon_mma, gluon_wgmma

        config = gluon_mma.gemm_config(p, m, _sm_count(index))
        if config is None and gluon_wgmma.hopper(index):  # rounds 15-16: 17..64 rows on warpgroup MMAs (sm_90)
            config = gluon_wgmma.gemm_config(p, m, _sm_count(index))
    config = config or gemm_config(p, m, _sm_count(index))
    if config.get("VARIANT") == "gluon_mma":
        from . import gluon_mma

        return gluon_mma.gemm(ops, p, x, bias, out, config)
    if config.get("VARIANT") == "gluon_wgmma":  # round 15: warpgroup MMAs, 1..64 rows
        from . import gluon_wgmma

        return gluon_wgmma.gemm(ops, p, x, bias, out, config)
    cfg = dict(config)
    if cfg.get("SPLIT_K") is None:  # a sweep's config may leave the split to the heuristic
        cfg["SPLIT_K"] = gemm_config(p, m, _sm_count(index))["SPLIT_K"]
    variant = cfg.pop("VARIANT", "v1")
    if variant == "v3":
        return _gemm3(ops, p, x, bias, out, cfg)
    if variant == "v2":
        return _gemm2(ops, p, x, bias, out, cfg)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    n_iters = triton.cdiv(p.in_features, p.group)
    per_split, split_k, target = _split_target(p, n_iters, cfg.pop("SPLIT_K"), m, out)
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
        _sum_partials(target, bias, out, split_k)
    return out


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for ``SEM`` split-K, one per output tile, kept per (device, stream): the kernel
    puts each counter back to zero, so launches in order on one stream share them (launches on two streams at
    once must not)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch.cuda.current_stream(device).stream_id)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def _split_target(p: Plan, n_groups: int, split_k: int, m: int, out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """``(groups per split, splits, target)``: no empty split; with more than one the float32 partials
    ``[splits, m, out_features]`` are the target, else ``out`` itself."""
    per_split = triton.cdiv(n_groups, split_k)
    split_k = triton.cdiv(n_groups, per_split)
    target = out if split_k == 1 else torch.empty(split_k, m, p.out_features, device=out.device, dtype=torch.float32)
    return per_split, split_k, target


def _sum_partials(target: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, split_k: int) -> None:
    """The second launch of split-K: ``out = sum of the partials in order 0..split_k-1 (+ bias)``."""
    mn = out.numel()
    block = 1024
    _splitk_sum[(triton.cdiv(mn, block),)](
        target, bias if bias is not None else target, out, mn, out.shape[-1],
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
    )


def _check_rows(block_m: int, m: int) -> None:
    if max(block_m, 16) < m:
        raise ValueError(f"BLOCK_M {block_m} is smaller than the {m} input rows: the tensor-core kernels hold every "
                         "input row in one tile (leave BLOCK_M out, or give a power of two >= the rows)")


def _gemm2(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           cfg: dict) -> torch.Tensor:
    """Launch :func:`_gemm2_kernel` (weight as the MMA's left operand) and, with split-K, the ordered sum
    (a second launch, or the kernel's own last program with ``SEM``)."""
    m = x.shape[0]
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    _check_rows(block_m, m)
    n_groups = triton.cdiv(p.in_features, p.group)
    per_split, split_k, target = _split_target(p, n_groups, cfg.pop("SPLIT_K"), m, out)
    tiles = triton.cdiv(p.out_features, block_n)
    grid = (tiles, split_k)
    has_bias = bias is not None
    sem = bool(cfg.pop("SEM", False)) and split_k > 1
    if cfg.get("PACKED") and p.kind == 2:
        if p.codebook not in _BOOKS:
            raise ValueError(f"no register table for codebook {p.codebook!r}: launch without PACKED")
        cfg["BOOK"] = _BOOKS[p.codebook]
    counters = _tile_counters(x.device, tiles) if sem else ops.scale
    _gemm2_kernel[grid](
        x, ops.codes, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.values, ops.values16,
        bias if has_bias else ops.scale, target,
        m, p.out_features, p.in_features, n_groups, x.stride(0), out.stride(0),
        ops.codes.stride(0), p.scale_row_stride, p.group_step, p.zero_row_stride, per_split, out, counters,
        GROUP=p.group, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=has_bias,
        SPLIT_K=split_k, BLOCK_M=max(block_m, 16), BLOCK_N=block_n, X_BF16=x.dtype == torch.bfloat16, SEM=sem,
        **cfg,
    )
    if split_k > 1 and not sem:
        _sum_partials(target, bias, out, split_k)
    return out


def _gemm3(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           cfg: dict) -> torch.Tensor:
    """Launch :func:`_gemm3_kernel` (words decoded in the MMA's fragment order); rows must be whole groups."""
    if p.in_features % p.group:
        raise ValueError(f"the v3 GEMM takes in_features a multiple of the group (in_features {p.in_features}, "
                         f"group {p.group}): use VARIANT 'v2'")
    m = x.shape[0]
    block_m = cfg.pop("BLOCK_M", triton.next_power_of_2(m))  # a sweep's config may leave it to the rows
    _check_rows(block_m, m)
    block_n = cfg.pop("BLOCK_N")
    n_groups = p.in_features // p.group
    per_split, split_k, target = _split_target(p, n_groups, cfg.pop("SPLIT_K"), m, out)
    tiles = triton.cdiv(p.out_features, block_n)
    has_bias = bias is not None
    sem = bool(cfg.pop("SEM", False)) and split_k > 1
    if p.kind == 2 and "BOOK" not in cfg:
        cfg["BOOK"] = _BOOKS.get(p.codebook, 0)
    counters = _tile_counters(x.device, tiles) if sem else ops.scale
    _gemm3_kernel[(tiles, split_k)](
        x, ops.words, ops.scale, ops.zero, ops.scale_absmax, ops.scale_offset, ops.dmap, ops.values,
        bias if has_bias else ops.scale, target,
        m, p.out_features, n_groups, x.stride(0), out.stride(0), ops.words.stride(0),
        p.scale_row_stride, p.group_step, p.zero_row_stride, per_split, out, counters,
        GROUP=p.group, KIND=p.kind, SCALE_DQ=p.double_quant, HAS_BIAS=has_bias, SPLIT_K=split_k,
        BLOCK_M=max(block_m, 16), BLOCK_N=block_n, X_BF16=x.dtype == torch.bfloat16, SEM=sem, **cfg,
    )
    if split_k > 1 and not sem:
        _sum_partials(target, bias, out, split_k)
    return out
