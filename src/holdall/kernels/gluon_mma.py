"""The 4-bit GEMV on tensor cores, in Gluon (issue 6, rounds 12-13 of the kernels): the default for 2..8 rows of
int4 sym layers (groups of 128+) with up to 11008 inputs and 2..16 rows of NF4 / FP4 (:func:`gemm_config`;
1.1-1.4x faster than the Triton ``v3`` GEMM there on an H200), not for one row (on an H200 its best tiling, one tile x 8
warps, took 12.4 / 11.5 / 5.9 us at 4096x11008 / 11008x4096 / 4096x4096 against the float Gluon GEMV's 10.6 / 9.5 /
4.7) nor for more rows; :func:`gemv` still takes one row with every epilogue, for sweeps (``bench/gluon_sweep.py
--mma``).

Why it was built: the float-activation Gluon GEMV (:mod:`holdall.kernels.gluon_wq4`) is issue-bound at ~3.4
thread-instructions per 4-bit code -- one PRMT decode and one FMA per code plus the activations' unpacking --
while its W4A8 sibling (int8 activations, DP4A) needs 1.7-2.4 and runs 1.2-1.4x faster. A tensor-core MMA does the
multiply-adds for 8 codes per thread-instruction instead of 1, so the decode is what is left: 11 instructions per 8
codes (2.5 per code in the SASS at 1 tile x 8 warps). At one row that did not pay (the kernel is bound by the weight
bytes each SM keeps in flight, not by instructions or MMAs); at 2..8 rows it does, since the MMA's 8 columns take
them at the cost of one.

Swap AB: ``y^T = W x^T`` with the weight rows as the MMA's M dimension (``mma.sync.m16n8k16``, bf16/fp16 in,
float32 accumulate) and the activation row as its N (8 columns; at batch 1 every column holds the same row, so the
quad's lanes load the same activations and no masking is needed). Each warp owns ``16 T`` weight rows; thread
``(g, c)`` of the warp (lane ``4 g + c``) holds rows ``g`` and ``g + 8`` of each 16-row tile and the 4 consecutive
words ``4 c .. 4 c + 3`` of every 16-word (128-code) chunk: one 16-byte load per row and chunk, 64 contiguous
bytes per row across the quad. One PRMT turns two stored codes ``n`` into the bf16 pair ``(128 + n, 128 + n')``
and one packed FMA centres it, ``(n - 8, n' - 8)`` exactly (:func:`holdall.kernels.ptx.centered_nibbles_asm`),
and a word's four pairs are exactly two MMA steps' A registers of its
row -- because the order of the inputs inside a chunk does not change a dot product, the chunk's 128 inputs are
fed to the MMA in the order the registers already hold them, and the activations are fed in the same order:

* code ``phi`` of a chunk (thread ``c``, word ``w``, pair register ``r``, half ``e``): ``phi = 32 c + 8 w + 2 e +
  4 (r & 1) + (r >> 1)`` (``nibbles_asm``: ``$0 = (0, 2)``, ``$1 = (4, 6)``, ``$2 = (1, 3)``, ``$3 = (5, 7)``);
* MMA step ``(w, p)`` (8 per chunk) takes ``a0, a1 = pair r = p`` of rows ``g``, ``g + 8`` and ``a2, a3 = pair
  r = p + 2``; the matching B registers are ``b0 = (x[b], x[b + 2])`` and ``b1 = (x[b + 1], x[b + 3])`` with ``b =
  32 c + 8 w + 4 p`` -- two PRMTs of the thread's own 16 activation words, shared by its ``T`` tiles.

The MMA sums ``(n - 8) x`` over the chunk into a fresh float32 accumulator; the chunk's group scale is applied
once per chunk and row (one FMA), for groups of whole chunks (128, 256, ... codes, or one scale per row). Codebooks
(NF4 / FP4, looked up in a register table) and groups of 32 / 64 take ``FOLD`` instead (:func:`folds`): thread
``c``'s 32 inputs share one scale, but each MMA step mixes the chunk's four threads, so the decode multiplies the
scale into the weights (:func:`holdall.kernels.ptx.scaled_pairs_asm`, rounding once to 16 bits as the v3 GEMM's
``FOLD16`` does) and the MMAs add straight into the outputs; double-quantized scales are decoded per group as the
Triton kernels do. ``WK`` warps split a row's chunks; their partial sums
meet in shared memory at the end. The MMA itself is inline PTX on per-thread registers (every lane runs it in the
same order, as ``mma.sync`` needs), so no operand layout has to be negotiated with the compiler.

Plain-torch reference: :func:`holdall.kernels.packed.reference_linear`.
"""

from __future__ import annotations

import torch

from . import ptx
from .gluon_wq4 import pdl_enabled, programs_for
from .packed import CODES_PER_WORD, Operands, Plan

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = None

CHUNK_WORDS = 16  # words per chunk: 4 threads x 4 words = 128 codes
MAX_ROWS = 64  # activation rows per launch: up to 8 tiles of MMA columns (with the rounds in a loop: SASS, no spills)
MAX_UNROLLED_ROUNDS = 11  # chunks per warp the small-batch default unrolls (11008 inputs on 8 warps; 14336: v3)
SHORT_ROW_ROUNDS = 4  # up to this many rounds per warp (4096 inputs on 8 warps) the loads are not run ahead
#: PRMT selectors that make an MMA step's B registers from two activation pairs (x[b], x[b+1]), (x[b+2], x[b+3]):
#: b0 = (x[b], x[b+2]) (both low halves), b1 = (x[b+1], x[b+3]) (both high halves)
B0_SEL, B1_SEL = 0x5410, 0x7632


#: codebook name -> the kernel's ``BOOK`` (0: symmetric int codes)
BOOKS = {"nf4": 1, "fp4": 2}


def why_not(p: Plan) -> str | None:
    """Why this kernel cannot take a layer of plan ``p`` (None when it can)."""
    if p.kind == 1:
        return "it decodes symmetric int codes and codebooks, not asymmetric zeros (the Triton kernels do)"
    if p.kind == 2 and p.codebook not in BOOKS:
        return f"codebook {p.codebook!r} has no register table (only {sorted(BOOKS)})"
    if p.in_features % (CHUNK_WORDS * CODES_PER_WORD):
        return f"in_features {p.in_features} is not a whole number of 128-input chunks"
    if p.group < 4 * CODES_PER_WORD and p.group != p.in_features:
        return f"groups of {p.group} split a thread's 4 words (32 inputs)"
    return None


def folds(p: Plan) -> bool:
    """Whether the scale goes into the decoded weights (``FOLD``) rather than onto each chunk's float32 sums:
    codebooks and groups shorter than a chunk (a thread's 32 inputs then carry their own scale, and each MMA
    step mixes the chunk's threads). Symmetric int codes in whole chunks keep the float32 scale (more exact)."""
    return p.kind == 2 or (p.group % (CHUNK_WORDS * CODES_PER_WORD) != 0 and p.group != p.in_features)


if gl is not None:
    from .gluon_wq4 import _epilogue, _squares_in, _tile_rows, _wait_for_producer

    _B0_SEL = gl.constexpr(B0_SEL)
    _B1_SEL = gl.constexpr(B1_SEL)
    _NIB_BF16 = gl.constexpr(ptx.centered_nibbles_asm(True))
    _NIB_F16 = gl.constexpr(ptx.centered_nibbles_asm(False))
    # the decode with the scale folded in (FOLD): int codes, NF4, FP4; bf16 / fp16
    _SC_INT_BF16 = gl.constexpr(ptx.scaled_pairs_asm(None, True))
    _SC_INT_F16 = gl.constexpr(ptx.scaled_pairs_asm(None, False))
    _SC_NF4_BF16 = gl.constexpr(ptx.scaled_pairs_asm("nf4", True))
    _SC_NF4_F16 = gl.constexpr(ptx.scaled_pairs_asm("nf4", False))
    _SC_FP4_BF16 = gl.constexpr(ptx.scaled_pairs_asm("fp4", True))
    _SC_FP4_F16 = gl.constexpr(ptx.scaled_pairs_asm("fp4", False))
    _SC_IO = gl.constexpr("=r,=r,=r,=r,r,h")  # four pairs out; the word and the 16-bit scale in
    _MMA_BF16 = gl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, "
                             "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
    _MMA_F16 = gl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, "
                            "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

    @gluon.jit
    def _pairs(w, X_BF16: gl.constexpr):
        """A word's 8 symmetric codes as four 16-bit float pairs ``n - 8`` (``$0 = (0, 2)``, ``$1 = (4, 6)``,
        ``$2 = (1, 3)``, ``$3 = (5, 7)``), int32 bits (:func:`holdall.kernels.ptx.centered_nibbles_asm`)."""
        if X_BF16:
            return gl.inline_asm_elementwise(_NIB_BF16, "=r,=r,=r,=r,r", [w], (gl.int32,) * 4, True, 1)
        else:
            return gl.inline_asm_elementwise(_NIB_F16, "=r,=r,=r,=r,r", [w], (gl.int32,) * 4, True, 1)

    @gluon.jit
    def _scaled_pairs(w, s16, BOOK: gl.constexpr, X_BF16: gl.constexpr):
        """:func:`_pairs` times the 16-bit scale ``s16`` (shaped like ``w``), rounded once; ``BOOK`` 0 int codes
        (centred), 1 NF4, 2 FP4 (:func:`holdall.kernels.ptx.scaled_pairs_asm`)."""
        if BOOK == 0:
            if X_BF16:
                return gl.inline_asm_elementwise(_SC_INT_BF16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)
            else:
                return gl.inline_asm_elementwise(_SC_INT_F16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)
        elif BOOK == 1:
            if X_BF16:
                return gl.inline_asm_elementwise(_SC_NF4_BF16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)
            else:
                return gl.inline_asm_elementwise(_SC_NF4_F16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)
        else:
            if X_BF16:
                return gl.inline_asm_elementwise(_SC_FP4_BF16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)
            else:
                return gl.inline_asm_elementwise(_SC_FP4_F16, _SC_IO, [w, s16], (gl.int32,) * 4, True, 1)

    @gluon.jit
    def _mma(c0, c1, c2, c3, a0, a1, a2, a3, b0, b1, X_BF16: gl.constexpr):
        """One ``m16n8k16`` MMA per element position (every lane of a warp runs them in the same order)."""
        if X_BF16:
            return gl.inline_asm_elementwise(_MMA_BF16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                             [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], (gl.float32,) * 4, True, 1)
        else:
            return gl.inline_asm_elementwise(_MMA_F16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                             [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], (gl.float32,) * 4, True, 1)

    @gluon.jit
    def _prmt(a, b, SEL: gl.constexpr):
        """``prmt.b32`` of two int32 tensors (``0x5410``: both low halves, ``0x7632``: both high halves)."""
        return gl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SEL};", "=r,r,r", [a, b], gl.int32, True, 1)

    @gluon.jit
    def _split2(t):
        """``t [..., 2]`` -> its two ``[...]`` halves."""
        return gl.split(t)

    @gluon.constexpr_function
    def _slice_for(layout, rank, dim):
        """The 1-D layout of dimension ``dim`` of a rank-``rank`` ``layout`` (the others sliced away, highest
        first, so that ``expand_dims`` in increasing order rebuilds it)."""
        for d in reversed(range(rank)):
            if d != dim:
                layout = gl.SliceLayout(d, layout)
        return layout

    @gluon.jit
    def _iota(n: gl.constexpr, layout: gl.constexpr, RANK: gl.constexpr, DIM: gl.constexpr):
        """``arange(n)`` along dimension ``DIM`` of a rank-``RANK`` tensor in ``layout`` (size 1 elsewhere)."""
        t = gl.arange(0, n, layout=_slice_for(layout, RANK, DIM))
        for d in gl.static_range(RANK):
            if d != DIM:
                t = gl.expand_dims(t, d)
        return t

    @gluon.jit
    def _last4(t):
        """``t [..., 4]`` -> its four ``[...]`` slices."""
        a, b = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))
        t0, t2 = gl.split(a)
        t1, t3 = gl.split(b)
        return t0, t1, t2, t3

    @gluon.jit
    def _chunk(w, xp, x_ok, acc0, acc1, acc2, acc3, s_lo, s_hi, MASKED: gl.constexpr, L5: gl.constexpr,
               X_BF16: gl.constexpr, BOOK: gl.constexpr, FOLD: gl.constexpr):
        """The MMA sums of one chunk: ``w [WK, 2T, 8, 4, 4]`` words (row pair ``2 i + h`` = rows ``16 i + 8 h +
        g``, g, c, word) and the thread's activation pairs at ``xp [WK, NT, 8, 4, 4]`` (int32 pointers; column
        tile ``nt`` of lane ``g``: activation row ``8 nt + g``; pair ``4 i + j`` = inputs ``32 c + 8 i + 2 j``,
        ``+ 1``, loaded one word ``i`` at a time so that only 4 per column tile are live; ``MASKED``: where
        ``x_ok``) -> the MMAs'
        ``c0..c3`` float32 ``[WK, T, NT, 8, 4]``: rows ``g`` x columns ``2 c``, ``2 c + 1``, rows ``g + 8`` x the
        same (at batch 1 every column is the same). The codes enter already centred (``n - 8``, one packed FMA
        per pair in the decode): round 12's first version took the offset off with 8 more MMAs per chunk
        (``-(MAG + 8)`` times the activations), as many as the dot itself. The A
        registers of a step serve every column tile and the B registers every row tile (the MMA is elementwise
        over ``[T, 1]`` x ``[1, NT]``). The MMAs add into ``acc0..acc3`` (zeros, or with ``FOLD`` the outputs'
        accumulators: the weights then enter scaled, ``s_lo`` / ``s_hi`` the 16-bit scales of rows ``g`` / ``g +
        8`` per thread ``[WK, T, 1, 8, 4]``, and ``BOOK`` picks the decode: 0 int codes, 1 NF4, 2 FP4)."""
        KW: gl.constexpr = w.shape[0]
        T: gl.constexpr = w.shape[1] // 2
        LA: gl.constexpr = gl.SliceLayout(2, L5)  # [WK, T, 8, 4]
        LB: gl.constexpr = gl.SliceLayout(1, L5)  # [WK, NT, 8, 4]
        # [WK, T, 8, 4, 4 (word), 2 (h)] -> rows g / g + 8, each [WK, T, 8, 4, 4]
        lo_rows, hi_rows = gl.split(gl.permute(gl.reshape(w, [KW, T, 2, 8, 4, 4]), [0, 1, 3, 4, 5, 2]))
        lo_w = _last4(lo_rows)
        hi_w = _last4(hi_rows)
        for i in gl.static_range(4):
            w_lo = gl.expand_dims(gl.convert_layout(lo_w[i], LA, assert_trivial=True), 2)
            w_hi = gl.expand_dims(gl.convert_layout(hi_w[i], LA, assert_trivial=True), 2)
            if FOLD:
                a_lo = _scaled_pairs(w_lo, s_lo, BOOK, X_BF16)
                a_hi = _scaled_pairs(w_hi, s_hi, BOOK, X_BF16)
            else:
                a_lo = _pairs(w_lo, X_BF16)
                a_hi = _pairs(w_hi, X_BF16)
            if MASKED:
                xq = gl.load(xp + 4 * i, mask=x_ok, other=0)
            else:
                xq = gl.load(xp + 4 * i)
            xj = _last4(xq)  # pairs 4 i + 0..3: inputs 32 c + 8 i + (0, 1), (2, 3), (4, 5), (6, 7)
            for p in gl.static_range(2):
                x01 = gl.convert_layout(xj[2 * p], LB, assert_trivial=True)
                x23 = gl.convert_layout(xj[2 * p + 1], LB, assert_trivial=True)
                b0 = _prmt(x01, x23, _B0_SEL)
                b1 = _prmt(x01, x23, _B1_SEL)
                acc0, acc1, acc2, acc3 = _mma(acc0, acc1, acc2, acc3, a_lo[p], a_hi[p], a_lo[p + 2], a_hi[p + 2],
                                              gl.expand_dims(b0, 1), gl.expand_dims(b1, 1), X_BF16)
        return acc0, acc1, acc2, acc3

    @gluon.jit
    def _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, it, WK: gl.constexpr, N_CHUNKS: gl.constexpr,
                        GROUP_W: gl.constexpr, scale_row_stride, group_step, MASKED: gl.constexpr):
        """Round ``it``'s words ``[WK, 2T, 8, 4, 4]`` and float32 scales ``[WK, 2T, 8, 4]`` (warp ``kw`` takes
        chunk ``it WK + kw``; ``MASKED``: the last, partial round, where the warps past the row read zeros).
        ``sp = (scales, nested absmax, offset, map, c)``: groups shorter than a chunk give thread ``c`` (words
        ``4 c .. 4 c + 3``) its own scale; uint8 scales are double-quantized, ``map[code] * absmax[i // 256] +
        offset`` (the 1 KB map stays in L1)."""
        s_ptr, sabs_ptr, soff_ptr, dmap_ptr, c_s = sp
        chunk_w = it * WK + kw_w
        chunk_s = it * WK + kw_s
        index = rows_s * scale_row_stride + ((16 * chunk_s) // GROUP_W) * group_step
        if GROUP_W < 16:
            index += ((4 * c_s) // GROUP_W) * group_step
        s_ok = (chunk_s < N_CHUNKS) & (rows_s >= 0)
        if MASKED:
            w = gl.load(w_base + 16 * chunk_w, mask=(chunk_w < N_CHUNKS) & (w_in >= 0), other=0)
        else:
            w = gl.load(w_base + 16 * chunk_w)
        if s_ptr.dtype.element_ty == gl.uint8:
            if MASKED:
                code = gl.load(s_ptr + index, mask=s_ok, other=0).to(gl.int32)
                nested = gl.load(sabs_ptr + index // 256, mask=s_ok, other=0.0)
            else:
                code = gl.load(s_ptr + index).to(gl.int32)
                nested = gl.load(sabs_ptr + index // 256)
            s = gl.load(dmap_ptr + code) * nested + gl.load(soff_ptr)
            if MASKED:  # a code of 0 is not a scale of 0
                s = gl.where(s_ok, s, 0.0)
        else:
            if MASKED:
                s = gl.load(s_ptr + index, mask=s_ok, other=0.0)
            else:
                s = gl.load(s_ptr + index)
        return w, s.to(gl.float32)

    @gluon.jit
    def _row_scales(s, L5: gl.constexpr):
        """A round's scales ``[WK, 2T, 8, 4]`` -> those of rows ``g`` and ``g + 8``, each ``[WK, T, 1, 8, 4]``."""
        KW: gl.constexpr = s.shape[0]
        T: gl.constexpr = s.shape[1] // 2
        s_lo, s_hi = gl.split(gl.permute(gl.reshape(s, [KW, T, 2, 8, 4]), [0, 1, 3, 4, 2]))
        s_lo = gl.expand_dims(gl.convert_layout(s_lo, gl.SliceLayout(2, L5), assert_trivial=True), 2)
        s_hi = gl.expand_dims(gl.convert_layout(s_hi, gl.SliceLayout(2, L5), assert_trivial=True), 2)
        return s_lo, s_hi

    @gluon.jit
    def _round(y_lo, y_lo1, y_hi, y_hi1, w, s, xp, x_ok, MASKED: gl.constexpr, L5: gl.constexpr,
               X_BF16: gl.constexpr, MULTI: gl.constexpr, BOOK: gl.constexpr, FOLD: gl.constexpr):
        """One round of chunks (one per warp) into the accumulators: the MMA sums times each row's scale (with
        ``FOLD``, the scaled weights' MMAs straight into the accumulators)."""
        KW: gl.constexpr = w.shape[0]
        T: gl.constexpr = w.shape[1] // 2
        if FOLD:  # the scale rounded to the activation dtype (~2**-9 relative in bf16), shared by 32-128 codes
            s_lo, s_hi = _row_scales(s, L5)
            if X_BF16:
                return _chunk(w, xp, x_ok, y_lo, y_lo1, y_hi, y_hi1, s_lo.to(gl.bfloat16), s_hi.to(gl.bfloat16),
                              MASKED, L5, X_BF16, BOOK, True)
            else:
                return _chunk(w, xp, x_ok, y_lo, y_lo1, y_hi, y_hi1, s_lo.to(gl.float16), s_hi.to(gl.float16),
                              MASKED, L5, X_BF16, BOOK, True)
        zero = gl.zeros([KW, T, y_lo.shape[2], 8, 4], gl.float32, L5)
        lo, lo1, hi, hi1 = _chunk(w, xp, x_ok, zero, zero, zero, zero, 0, 0, MASKED, L5, X_BF16, BOOK, False)
        s_lo, s_hi = _row_scales(s, L5)
        y_lo += lo * s_lo
        y_hi += hi * s_hi
        if MULTI:
            y_lo1 += lo1 * s_lo
            y_hi1 += hi1 * s_hi
        return y_lo, y_lo1, y_hi, y_hi1

    @gluon.jit
    def _load_round(w_base, sp, rows_s, kw_w, kw_s, w_in, it: gl.constexpr, WK: gl.constexpr,
                    N_CHUNKS: gl.constexpr, GROUP_W: gl.constexpr, scale_row_stride, group_step, FULL: gl.constexpr):
        """Round ``it``'s words and scales (the round after the full ones masked), as one tuple."""
        w, s = _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, it, WK, N_CHUNKS, GROUP_W, scale_row_stride,
                               group_step, it >= FULL)
        return (w, s)

    @gluon.jit
    def _load_first_rounds(w_base, sp, rows_s, kw_w, kw_s, w_in, WK: gl.constexpr, N_CHUNKS: gl.constexpr,
                           GROUP_W: gl.constexpr, scale_row_stride, group_step, FULL: gl.constexpr,
                           TAIL: gl.constexpr, RING: gl.constexpr):
        """The first ``RING`` (1-3) rounds' words and scales, oldest first (rounds past the row: never read)."""
        ROUNDS: gl.constexpr = FULL + (1 if TAIL else 0)
        r0 = _load_round(w_base, sp, rows_s, kw_w, kw_s, w_in, 0, WK, N_CHUNKS, GROUP_W, scale_row_stride,
                         group_step, FULL)
        r1 = r0
        r2 = r0
        if RING > 1 and ROUNDS > 1:
            r1 = _load_round(w_base, sp, rows_s, kw_w, kw_s, w_in, 1, WK, N_CHUNKS, GROUP_W, scale_row_stride,
                             group_step, FULL)
        if RING > 2 and ROUNDS > 2:
            r2 = _load_round(w_base, sp, rows_s, kw_w, kw_s, w_in, 2, WK, N_CHUNKS, GROUP_W, scale_row_stride,
                             group_step, FULL)
        return (r0, r1, r2)

    @gluon.jit
    def _rounds_ahead(y_lo, y_lo1, y_hi, y_hi1, ring, w_base, sp, rows_s, kw_w, kw_s, w_in, x_base, x_in, kw_x,
                      WK: gl.constexpr, N_CHUNKS: gl.constexpr, GROUP_W: gl.constexpr, scale_row_stride,
                      group_step, FULL: gl.constexpr, TAIL: gl.constexpr, RING: gl.constexpr, L5: gl.constexpr,
                      X_BF16: gl.constexpr, MULTI: gl.constexpr, BOOK: gl.constexpr, FOLD: gl.constexpr):
        """Every round (the partial last one too), each one's loads issued ``len(ring)`` rounds before its MMAs:
        ``ring`` holds the next ``RING`` rounds' ``(words, scales)`` (three slots, oldest first); each round
        consumed frees a slot for the round ``RING`` further on. Why: at one 16-row tile per warp a round is 1 KB of a
        warp's weights, and loading it just before its MMAs keeps too few bytes in flight per SM (round 12:
        the FMA GEMV, 4 KB per warp per tile, was faster despite more instructions)."""
        ROUNDS: gl.constexpr = FULL + (1 if TAIL else 0)
        r0, r1, r2 = ring
        for it in gl.static_range(ROUNDS):
            w, s = r0
            r0 = r1
            r1 = r2
            if it + RING < ROUNDS:  # refill the slot just freed: RING rounds ahead
                nxt = _load_round(w_base, sp, rows_s, kw_w, kw_s, w_in, it + RING, WK, N_CHUNKS, GROUP_W,
                                  scale_row_stride, group_step, FULL)
                if RING == 1:
                    r0 = nxt
                elif RING == 2:
                    r1 = nxt
                else:
                    r2 = nxt
            x_ok = (it * WK + kw_x < N_CHUNKS) & (x_in >= 0)
            y_lo, y_lo1, y_hi, y_hi1 = _round(y_lo, y_lo1, y_hi, y_hi1, w, s, x_base + 64 * WK * it, x_ok,
                                              it >= FULL, L5, X_BF16, MULTI, BOOK, FOLD)
        return y_lo, y_lo1, y_hi, y_hi1

    @gluon.jit
    def _store_columns(y_lo, y_lo1, y_hi, y_hi1, t, b_ptr, y_ptr, N, M, stride_y, HAS_BIAS: gl.constexpr):
        """Several activation rows' outputs: the warps' partial sums of rows ``g`` / ``g + 8`` x columns
        ``8 nt + 2 c`` / ``+ 1`` (``[WK, T, NT, 8, 4]`` each) plus the bias, stored to ``y [M, N]``."""
        T: gl.constexpr = y_lo.shape[1]
        NT: gl.constexpr = y_lo.shape[2]
        lo = gl.sum(y_lo, axis=0)  # [T, NT, 8, 4]
        LO: gl.constexpr = lo.type.layout
        quad = _iota(4, LO, 4, 3)
        rows = t * (16 * T) + 16 * _iota(T, LO, 4, 0) + _iota(8, LO, 4, 2) + 0 * quad + 0 * _iota(NT, LO, 4, 1)
        cols = 8 * _iota(NT, LO, 4, 1) + 2 * quad
        dt: gl.constexpr = y_ptr.dtype.element_ty
        for h in gl.static_range(2):  # rows g, g + 8
            r = rows + 8 * h
            bias = gl.load(b_ptr + r, mask=r < N, other=0.0).to(gl.float32) if HAS_BIAS else 0.0
            for e in gl.static_range(2):  # columns 2 c, 2 c + 1
                part = gl.sum((y_lo, y_lo1, y_hi, y_hi1)[2 * h + e], axis=0)
                col = cols + e
                gl.store(y_ptr + col * stride_y + r, (part + bias).to(dt), mask=(r < N) & (col < M))

    @gluon.jit
    def _gemv_mma_kernel(x_ptr, w_ptr, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, b_ptr, y_ptr, sq_in_ptr, n_sq, eps,
                         nw_ptr, h_ptr, sq_out_ptr, N, n_half, stride_wn, scale_row_stride, group_step, M,
                         stride_x, stride_y,
                         K_WORDS: gl.constexpr, GROUP_W: gl.constexpr, T: gl.constexpr, WK: gl.constexpr,
                         X_BF16: gl.constexpr, HAS_BIAS: gl.constexpr, NORM_IN: gl.constexpr,
                         SQ_BLOCK: gl.constexpr, NORM_OUT: gl.constexpr, GLU: gl.constexpr,
                         PDL: gl.constexpr = False, NT: gl.constexpr = 0,
                         UNROLL: gl.constexpr = True, AHEAD: gl.constexpr = 0, BOOK: gl.constexpr = 0,
                         FOLD: gl.constexpr = False):
        """Program ``t``'s ``R = 16 T`` rows (tile position ``16 i + 8 h + g`` of warp tile ``i``; ``GLU``: gate
        and up rows interleaved, :func:`holdall.kernels.gluon_wq4._tile_rows`); ``x_ptr`` the activation row as
        int32 pairs, ``y`` one row; the epilogues are :func:`holdall.kernels.gluon_wq4._epilogue`'s.
        ``NT`` > 0: ``M`` (up to ``8 NT``) rows of ``x`` (``stride_x`` int32 pairs
        apart) as ``NT`` tiles of MMA columns (lane ``g`` of tile ``nt`` loads row ``8 nt + g``), written to ``y
        [M, N]`` (``stride_y``) with the bias only. ``UNROLL``: the rounds over ``K`` unrolled (else a loop);
        ``AHEAD`` (1-3, with ``UNROLL``): each round's words and scales loaded that many rounds before its MMAs
        (:func:`_rounds_ahead`; with ``PDL`` the first ``AHEAD`` before the wait). ``BOOK`` 0 symmetric int codes,
        1 NF4, 2 FP4; ``FOLD``: the scale multiplied into the decoded weights (:func:`folds`); uint8 scales are
        double-quantized (``sabs_ptr`` nested absmax, ``soff_ptr`` offset, ``dmap_ptr`` map)."""
        COLS: gl.constexpr = NT if NT > 0 else 1  # MMA column tiles
        LW: gl.constexpr = gl.BlockedLayout([1, 2 * T, 1, 1, 4], [1, 1, 8, 4, 1], [WK, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        LX: gl.constexpr = gl.BlockedLayout([1, COLS, 1, 1, 4], [1, 1, 8, 4, 1], [WK, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        LS: gl.constexpr = gl.BlockedLayout([1, 2 * T, 1, 1], [1, 1, 8, 4], [WK, 1, 1, 1], [3, 2, 1, 0])
        L5: gl.constexpr = gl.BlockedLayout([1, T, COLS, 1, 1], [1, 1, 1, 8, 4], [WK, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        R: gl.constexpr = 16 * T
        N_CHUNKS: gl.constexpr = K_WORDS // 16
        t = gl.program_id(0)
        # weights: tile position 8 rr + g (rr = 2 i + h), words 16 chunk + 4 c + w
        rows_w, _ = _tile_rows(8 * _iota(2 * T, LW, 5, 1) + _iota(8, LW, 5, 2), t, R, N, n_half, GLU)
        kw_w = _iota(WK, LW, 5, 0)
        w_in = 4 * _iota(4, LW, 5, 3) + _iota(4, LW, 5, 4)  # word within the chunk
        w_base = w_ptr + (rows_w * stride_wn + w_in)
        # activations: pairs 64 chunk + 16 c + j of row 8 nt + g (the last row again past M; one row at batch 1)
        kw_x = _iota(WK, LX, 5, 0)
        x_in = 16 * _iota(4, LX, 5, 3) + _iota(4, LX, 5, 4)
        if NT > 0:
            x_in += gl.minimum(8 * _iota(COLS, LX, 5, 1) + _iota(8, LX, 5, 2), M - 1) * stride_x
        else:  # every lane the one row
            x_in += 0 * _iota(8, LX, 5, 2)
        # scales of the same rows, one per chunk (the quad's four lanes load the same one)
        rows_s, _ = _tile_rows(8 * _iota(2 * T, LS, 4, 1) + _iota(8, LS, 4, 2), t, R, N, n_half, GLU)
        c_s = _iota(4, LS, 4, 3)
        rows_s = rows_s + 0 * c_s
        kw_s = _iota(WK, LS, 4, 0)
        sp = (s_ptr, sabs_ptr, soff_ptr, dmap_ptr, c_s)
        y_lo = gl.zeros([WK, T, COLS, 8, 4], gl.float32, L5)  # rows g x columns 2 c
        y_hi = gl.zeros_like(y_lo)  # rows g + 8 x columns 2 c
        y_lo1 = gl.zeros_like(y_lo)  # rows g x columns 2 c + 1 (several activation rows)
        y_hi1 = gl.zeros_like(y_lo)
        FULL: gl.constexpr = N_CHUNKS // WK  # rounds where every warp has a chunk; then maybe one partial round
        TAIL: gl.constexpr = N_CHUNKS % WK > 0
        MULTI: gl.constexpr = NT > 0
        RING: gl.constexpr = AHEAD if UNROLL else 0
        if RING > 0:  # rounds 0 .. RING - 1 in flight first (before the producer's wait: weights never change)
            ring = _load_first_rounds(w_base, sp, rows_s, kw_w, kw_s, w_in, WK, N_CHUNKS, GROUP_W,
                                      scale_row_stride, group_step, FULL, TAIL, RING)
            if PDL:
                _wait_for_producer()
        elif PDL:  # programmatic dependent launch: the first round's weights before waiting for x (gluon_wq4)
            w_first, s_first = _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, 0, WK, N_CHUNKS, GROUP_W,
                                               scale_row_stride, group_step, FULL == 0)
            _wait_for_producer()
        squares = _squares_in(sq_in_ptr, n_sq, SQ_BLOCK, WK, NORM_IN)
        x_base = x_ptr + (64 * kw_x + x_in)
        x_ok = x_in >= 0  # (full rounds: unmasked)
        first: gl.constexpr = 1 if PDL and FULL > 0 and RING == 0 else 0
        if first:
            y_lo, y_lo1, y_hi, y_hi1 = _round(y_lo, y_lo1, y_hi, y_hi1, w_first, s_first, x_base, x_ok, False, L5,
                                              X_BF16, MULTI, BOOK, FOLD)
        if RING > 0:
            y_lo, y_lo1, y_hi, y_hi1 = _rounds_ahead(y_lo, y_lo1, y_hi, y_hi1, ring, w_base, sp, rows_s, kw_w,
                                                     kw_s, w_in, x_base, x_in, kw_x, WK, N_CHUNKS, GROUP_W,
                                                     scale_row_stride, group_step, FULL, TAIL, RING, L5, X_BF16,
                                                     MULTI, BOOK, FOLD)
        elif UNROLL:  # K is a constant: every round's offsets are immediates, loads scheduled freely
            for it in gl.static_range(first, FULL):
                w, s = _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, it, WK, N_CHUNKS, GROUP_W,
                                       scale_row_stride, group_step, False)
                y_lo, y_lo1, y_hi, y_hi1 = _round(y_lo, y_lo1, y_hi, y_hi1, w, s, x_base + 64 * WK * it, x_ok,
                                                  False, L5, X_BF16, MULTI, BOOK, FOLD)
        else:  # a rolled loop: a small body (instruction cache) and fewer loads in flight (registers)
            for it in range(first, FULL):
                w, s = _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, it, WK, N_CHUNKS, GROUP_W,
                                       scale_row_stride, group_step, False)
                y_lo, y_lo1, y_hi, y_hi1 = _round(y_lo, y_lo1, y_hi, y_hi1, w, s, x_base + 64 * WK * it, x_ok,
                                                  False, L5, X_BF16, MULTI, BOOK, FOLD)
        if TAIL and RING == 0:  # the last round leaves some warps without a chunk: their weights and activations
            # read as 0
            if PDL and FULL == 0:
                w, s = w_first, s_first
            else:
                w, s = _weights_scales(w_base, sp, rows_s, kw_w, kw_s, w_in, FULL, WK, N_CHUNKS, GROUP_W,
                                       scale_row_stride, group_step, True)
            y_lo, y_lo1, y_hi, y_hi1 = _round(y_lo, y_lo1, y_hi, y_hi1, w, s, x_base + 64 * WK * FULL,
                                              FULL * WK + kw_x < N_CHUNKS, True, L5, X_BF16, MULTI, BOOK, FOLD)
        if NT > 0:
            _store_columns(y_lo, y_lo1, y_hi, y_hi1, t, b_ptr, y_ptr, N, M, stride_y, HAS_BIAS)
        else:
            # the WK warps' partial sums; every lane of a quad holds the same column (batch 1): keep one
            out_lo = gl.max(gl.sum(gl.sum(y_lo, axis=0), axis=1), axis=2)  # [T, 8]: rows 16 i + g
            out_hi = gl.max(gl.sum(gl.sum(y_hi, axis=0), axis=1), axis=2)  # rows 16 i + 8 + g
            # every thread all R rows (the epilogue's layout), then interleaved: tile position 16 i + 8 h + g
            LF: gl.constexpr = gl.BlockedLayout([T, 8], [1, 32], [1, WK], [1, 0])
            YL: gl.constexpr = gl.BlockedLayout([R], [32], [WK], [0])
            both = gl.join(gl.convert_layout(out_lo, LF), gl.convert_layout(out_hi, LF))  # [T, 8, 2]
            y = gl.convert_layout(gl.reshape(gl.permute(both, [0, 2, 1]), [R]), YL, assert_trivial=True)
            rows_y, ok_y = _tile_rows(gl.arange(0, R, layout=YL), t, R, N, n_half, GLU)
            _epilogue(y, rows_y, ok_y, t, squares, eps, b_ptr, y_ptr, n_half, nw_ptr, h_ptr, sq_out_ptr, y_ptr,
                      y_ptr, K_WORDS, HAS_BIAS, NORM_IN, NORM_OUT, GLU, False)


def _rounds(p: Plan, wk: int) -> int:
    """128-input chunks per warp when ``wk`` warps split a row."""
    return -(-p.in_features // (CHUNK_WORDS * CODES_PER_WORD) // wk)


def gemm_config(p: Plan, m: int, sms: int) -> dict | None:
    """The launch for ``m`` rows where this kernel is the fastest holdall has, else None (the Triton ``v3`` GEMM).

    Measured on an H200 (``bench/gemm_rows.py``; BENCHMARKS.md rounds 12-13): up to 8 rows (one tile of MMA
    columns, so 2..8 rows cost what one does) it is 1.2-1.3x faster than ``v3`` on 4096-input rows (4 rows:
    11008x4096 12.4 vs 15.7 us, 4096x4096 6.7 vs 8.6) and 1.09-1.15x on 11008-input rows with each round's loads
    issued 3 rounds ahead (4096x11008, 2 / 8 rows: 13.1 / 13.8 vs 15.0 / 15.0 us; unrolled without it 13.6 / 14.3);
    loads run ahead where a warp has more than 4 rounds (at 4 rounds, 4096 inputs on 8 warps, they tie or lose:
    6.87 vs 6.70 us); 16 rows were 1.1-1.4x slower and 64 rows 2-3x
    (every program re-reads all the rows' activations; staging them in shared memory, round 13's XS, was slower
    still). ``WK``: 8 warps per 16 weight rows unless that passes ~24 warps per SM (4096 rows: 8 warps 6.7 us, 4:
    9.5; 11008 rows: 4 warps 12.3, 8: 15.0).

    Codebooks (round 13) take it up to 16 rows: their decode costs ~2x the int codes' instructions, which the v3
    GEMM pays per column tile too (NF4 / NF4 + double quant, 2..8 rows: 18-21 us against v3's 24.5-26.5, 1.3-1.6x
    bf16; 16 rows 11.6-24.4 us against 13.0-26.5). Folded formats (:func:`folds`) run no loads ahead (NF4 at
    11008 inputs: 18.2 us unrolled, 18.6 with). Int groups of 64 and double-quantized int scales (round 14) take
    it up to 8 rows as int4 g128 does (2 / 8 rows, us: g64 11.96 / 14.21 vs v3's 19.06 / 19.26 at 11008x4096,
    14.07 / 14.67 vs 19.07 / 19.27 at 4096x11008, 7.22 / 7.56 vs 10.21 / 10.44 at 4096x4096; int4 g128 + double
    quant 1.10-1.29x faster than v3), not at 16 rows (1.0-1.2x slower)."""
    fold = folds(p)
    if m > (16 if p.kind == 2 else 8) or why_not(p) is not None:  # codebooks were timed to 16 rows, int codes to 8
        return None
    if p.kind == 0 and fold and p.group < 64:  # int groups of 32: correct (device tests), not timed
        return None
    wk = 8 if -(-p.out_features // 16) * 8 <= 24 * sms else 4
    rounds = _rounds(p, wk)
    if rounds > MAX_UNROLLED_ROUNDS:
        return None
    # loads run ahead only where that was timed: int codes with plain scales
    ahead = 3 if rounds > SHORT_ROW_ROUNDS and not (fold or p.double_quant) else 0
    return {"VARIANT": "gluon_mma", "BLOCK_N": 16, "TILES": 1, "WK": wk, "PDL": False, "UNROLL": True,
            "AHEAD": ahead}


def gemv_config(p: Plan, sms: int, chained: bool = False) -> dict | None:
    """The one-row launch for codebooks (NF4 / FP4, which the Gluon FMA GEMV :mod:`holdall.kernels.gluon_wq4`
    cannot take), else None (the FMA GEMV for int sym codes, ~20% faster at one row in round 12; the TMA GEMV for
    the rest, int double-quantized scales untimed here at one row). 8 warps per 16-row tile on every shape: one row
    leaves the SMs more room than :func:`gemm_config`'s 4 warps assume (round 14, us, NF4 / NF4 + double quant:
    18.7 / 17.9 at 4096x11008, 17.2 / 17.8 at 11008x4096, 7.0 / 7.1 at 4096x4096, 30.1 / 31.4 at 22016x4096, 17.3
    / 18.0 at 12288x4096, against the one-row TMA GEMV's 20.1 / 23.7, 18.8 / 20.9, 9.0 / 9.6, 33.5 / 37.7, 19.0 /
    21.0 in the same run; 4 warps at 11008x4096 19.6 / 22.4). ``chained`` as
    :func:`holdall.kernels.gluon_wq4.gemv_config` (programmatic dependent launch in a decode step)."""
    if p.kind != 2 or why_not(p) is not None or _rounds(p, 8) > MAX_UNROLLED_ROUNDS:
        return None
    return {"VARIANT": "gluon_mma", "BLOCK_N": 16, "TILES": 1, "WK": 8, "PDL": chained and pdl_enabled(),
            "UNROLL": True, "AHEAD": 0}  # folded formats run no loads ahead (gemm_config)


def _launch_options(cfg: dict, unroll: bool) -> tuple[int, int, bool, bool, int]:
    """``(TILES, WK, PDL, UNROLL, AHEAD)`` of a launch config, checked (``unroll``: the default)."""
    tiles, wk, pdl = int(cfg.get("TILES", 2)), int(cfg.get("WK", 4)), bool(cfg.get("PDL", False))
    unroll, ahead = bool(cfg.get("UNROLL", unroll)), int(cfg.get("AHEAD", 0))
    # WK 16 (512 threads): twice the warps per 16 rows, so twice the weight bytes in flight per tile of rows
    if tiles not in (1, 2, 4) or wk not in (1, 2, 4, 8, 16) or int(cfg.get("BLOCK_N", 16 * tiles)) != 16 * tiles:
        raise ValueError(f"TILES must be 1, 2 or 4, WK 1, 2, 4, 8 or 16 and BLOCK_N 16 x TILES; got {cfg}")
    if wk == 16 and tiles > 1:  # SASS: two tiles take ~166 registers, x 512 threads more than an SM has
        raise ValueError(f"WK 16 takes one 16-row tile per warp (TILES 1); got {cfg}")
    if ahead not in (0, 1, 2, 3) or (ahead and not unroll):
        raise ValueError(f"AHEAD (rounds loaded ahead) must be 0-3, and needs UNROLL; got {cfg}")
    return tiles, wk, pdl, unroll, ahead


def gemv(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, cfg: dict,
         norm_in: tuple[torch.Tensor, float] | None = None,
         norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, glu: bool = False,
         ) -> torch.Tensor:
    """Launch :func:`_gemv_mma_kernel` for one contiguous bf16/fp16 row ``x [K]`` (``cfg``: ``TILES`` 16-row MMA
    tiles per warp, ``WK`` warps splitting the row, ``PDL``; ``BLOCK_N`` must be 16 ``TILES``; the other
    arguments as :func:`holdall.kernels.triton_wq4.gemv`, which calls this for ``VARIANT "gluon_mma"``)."""
    reason = why_not(p)
    if reason is not None:
        raise ValueError(f"the tensor-core GEMV cannot take this layer: {reason}")
    if x.dtype not in (torch.bfloat16, torch.float16) or x.numel() != p.in_features or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous bf16/fp16 row of {p.in_features}; got {x.dtype} {tuple(x.shape)}")
    tiles, wk, pdl, unroll, ahead = _launch_options(cfg, unroll=True)
    from .triton_wq4 import _norm_operands

    n_half, programs = programs_for(p, out, 16 * tiles, glu, norm_out)
    sq_in, eps, weight, h, sq_out = _norm_operands(ops, p, programs, norm_in, norm_out)
    bf16 = x.dtype == torch.bfloat16
    _gemv_mma_kernel[(programs,)](
        x.view(torch.int32), *_weights(ops), bias if bias is not None else ops.scale, out,
        sq_in, sq_in.numel(), float(eps), weight, h, sq_out, p.out_features, n_half, ops.words.stride(0),
        p.scale_row_stride, p.group_step, 1, 0, 0,
        T=tiles, WK=wk, X_BF16=bf16, HAS_BIAS=bias is not None, NORM_IN=norm_in is not None,
        SQ_BLOCK=max(32 * wk, 1 << max(0, (sq_in.numel() - 1).bit_length())) if norm_in is not None else 1,
        NORM_OUT=norm_out is not None, GLU=glu, PDL=pdl, UNROLL=unroll, AHEAD=ahead, **_format(p),
        num_warps=wk, launch_pdl=pdl,
    )
    return out


def _weights(ops: Operands) -> tuple[torch.Tensor, ...]:
    """The kernel's weight operands, in its argument order: codes, scales, and the double-quantized scales'
    nested absmax, offset and map (dummies otherwise) -- one place for both launchers."""
    return ops.words, ops.scale, ops.scale_absmax, ops.scale_offset, ops.dmap


def _format(p: Plan) -> dict:
    """The constexprs the layer's format fixes: row length in words, group in words, codebook, folded scale."""
    return {"K_WORDS": p.in_features // CODES_PER_WORD, "GROUP_W": p.group // CODES_PER_WORD,
            "BOOK": BOOKS.get(p.codebook, 0), "FOLD": folds(p)}


def column_tiles(m: int) -> int:
    """MMA column tiles for ``m`` activation rows: 8 rows each, a power of two."""
    return 1 << max(0, (-(-m // 8) - 1).bit_length())


def check_rows(p: Plan, x: torch.Tensor, out: torch.Tensor, kernel: str) -> int:
    """The rows ``x [M, K]`` and ``out [M, N]`` a tensor-core kernel reading ``x`` as int32 pairs can take (1..64
    bf16/fp16 rows, contiguous with an even row stride; rows of ``out`` contiguous) and a layer of plan ``p`` it
    can decode; ``M``, else ``ValueError`` naming what is wrong."""
    reason = why_not(p)
    if reason is not None:
        raise ValueError(f"{kernel} cannot take this layer: {reason}")
    m = x.shape[0]
    if x.dim() != 2 or not 1 <= m <= MAX_ROWS or x.shape[1] != p.in_features or x.stride(1) != 1 \
            or x.stride(0) % 2 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be 1..{MAX_ROWS} bf16/fp16 rows of {p.in_features} (contiguous, even row stride); "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if out.shape != (m, p.out_features) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {p.out_features}] with contiguous rows; got {tuple(out.shape)}")
    return m


def gemm(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         cfg: dict) -> torch.Tensor:
    """``out [M, N] = x W^T + b`` for 1..``MAX_ROWS`` rows ``x [M, K]`` (bf16/fp16, rows contiguous): the rows are
    the MMAs' columns, 8 per tile, so up to 8 rows cost what one does and each 8 more add one MMA per step
    (``cfg`` as :func:`gemv`; no fused epilogues)."""
    m = check_rows(p, x, out, "the tensor-core GEMV")
    # more columns: a loop keeps fewer loads in flight
    tiles, wk, pdl, unroll, ahead = _launch_options(cfg, unroll=column_tiles(m) == 1)
    if column_tiles(m) >= 8:  # 64 rows: two row tiles' accumulators spill (SASS)
        tiles = 1
    if wk == 16 and column_tiles(m) > 4:  # SASS: 174 registers x 512 threads, more than an SM's 65,536
        raise ValueError(f"WK 16 takes up to 32 rows (got {m}): use WK 8 or fewer")
    bf16 = x.dtype == torch.bfloat16
    _gemv_mma_kernel[(-(-p.out_features // (16 * tiles)),)](
        x.view(torch.int32), *_weights(ops), bias if bias is not None else ops.scale, out,
        ops.scale, 0, 0.0, ops.scale, ops.scale, ops.scale, p.out_features, p.out_features, ops.words.stride(0),
        p.scale_row_stride, p.group_step, m, x.stride(0) // 2, out.stride(0),
        T=tiles, WK=wk, X_BF16=bf16, HAS_BIAS=bias is not None, NORM_IN=False, SQ_BLOCK=1, NORM_OUT=False,
        GLU=False, PDL=pdl, NT=column_tiles(m), UNROLL=unroll, AHEAD=ahead, **_format(p),
        num_warps=wk, launch_pdl=pdl,
    )
    return out
