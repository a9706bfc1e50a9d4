"""The 4-bit GEMM for up to 64 activation rows on Hopper's warpgroup MMA, in Gluon (issue 6, rounds 15-16 of the
kernels): the default for 17..64 rows of int4 sym and NF4 / FP4 layers (:func:`gemm_config`; on an H200 1.0-1.5x
faster than the Triton ``v3`` GEMM; at 17..32 rows int4 1.22-1.43x bf16 cuBLAS and NF4 0.96-1.09x on the five
Llama-2-7B shapes, at 64 rows int4 0.83-1.22x and NF4 0.74-0.92x).

Why: at 64 rows neither tensor-core kernel holdall had beat bf16 cuBLAS (round 13: the Triton ``v3`` GEMM
0.73-1.06x, the ``mma.sync`` GEMV of :mod:`holdall.kernels.gluon_mma` 2-3x slower still). ``v3`` runs one
warpgroup per 128 weight rows with 213 registers a thread and re-orders every activation chunk in each program.
Here each warpgroup's ``wgmma.m64nNk16`` takes its 64 weight rows straight from the registers they were decoded
into, ``WG`` warpgroups (64 weight rows each) share each staged activation chunk, and the staging is either
through registers or by TMA.

Swap AB as in :mod:`holdall.kernels.gluon_mma`: ``y^T [N, M] = W [N, K] x^T``, the weight rows the MMA's M, the
activation rows its N (``MP`` = the rows rounded up to a power of two, 8..64). Each warp of a warpgroup owns 16
weight rows; thread ``(g, c)`` (lane ``4 g + c``) loads words ``4 c .. 4 c + 3`` of each 16-word (128-code) chunk
of rows ``g`` and ``g + 8`` -- one 16-byte load each -- and decodes every word into four 16-bit pairs with the
scale multiplied in (:func:`holdall.kernels.gluon_mma._scaled_pairs`, rounding once, as the ``v3`` GEMM's
``FOLD16``). Those registers are already the wgmma's A fragments (the same as ``mma.sync``'s for a warp's 16 rows)
once the chunk's inputs are taken in the order they hold them: logical input ``k = 32 wd + 16 p + 8 hk + 2 c + e``
of a chunk (``wd`` the word, ``p`` the MMA step within it, ``hk`` the fragment's half, ``e`` the element) is code
``phi = 32 c + 8 wd + 4 p + 2 e + hk`` of the stored chunk (:mod:`holdall.kernels.gluon_mma`'s docstring derives
it). The activations are staged in shared memory in that logical order: every thread loads 16 contiguous bytes of
a row (coalesced), two PRMTs per pair make the logical pairs ``(x[phi], x[phi + 2])``, and a swizzled
shared-memory store puts them where the wgmma's B descriptor reads them. So the dot is unchanged.

Per chunk: the next chunk's words and scales (``AHEAD`` chunks on) and activations are loaded first, the current
activations stored to one of two shared buffers, a fence and a barrier, the decode, one asynchronous wgmma per
warpgroup, and a wait for it (its A registers and the other buffer are then free). With ``XTMA`` the activations
are reordered once by :func:`fragment_order` (a torch copy; with ``PAD`` into a buffer of ``MP`` rows, zeros past
``M``: TMA boxes reaching far past a tensor's end are slow) and brought in by TMA through an mbarrier ring instead,
each chunk as two wgmmas of 64 inputs (:func:`_gemm_wgmma_tma_kernel`; it wins on tall layers). ``SPLIT_K``
programs split a row's chunks; their float32 partials are summed in a fixed order by each tile's last program (as ``v3``'s
``SEM``). Every format the ``mma.sync`` kernel takes (symmetric int codes with groups of 32 and up or one scale
per row, NF4 / FP4, double-quantized scales); no fused epilogues.

Plain-torch reference: :func:`holdall.kernels.packed.reference_linear`.
"""

from __future__ import annotations

import math

import torch

from .gluon_mma import BOOKS, CHUNK_WORDS, MAX_ROWS, _format, _weights, check_rows, folds, why_not
from .packed import Operands, Plan

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, \
        warpgroup_mma, warpgroup_mma_wait
except ImportError:  # no Triton with Gluon (CPU machines): the kernel is not defined, the launcher refuses
    gluon = gl = None

WARPGROUPS = (1, 2, 4)  # 64 weight rows each per program


if gl is not None:
    from .gluon_mma import _B0_SEL, _B1_SEL, _iota, _last4, _prmt, _scaled_pairs

    _CW = gl.constexpr(CHUNK_WORDS)

    @gluon.jit
    def _halves(pairs, DT: gl.constexpr):
        """int32 pairs ``[..., P]`` -> their 16-bit elements ``[..., 2 P]`` (low half first): register renaming."""
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs], (gl.int16, gl.int16), True, 1)
        both = gl.join(lo.to(DT, bitcast=True), hi.to(DT, bitcast=True))
        return gl.reshape(both, both.shape[:-2] + [2 * both.shape[-2]])

    @gluon.jit
    def _w_pointers(w_ptr, t, N, stride_wn, scale_row_stride, R: gl.constexpr, LW: gl.constexpr):
        """Tile ``t``'s word pointers ``[NW, 2, 8, 4, 4]`` (row ``R t + 16 warp + 8 hr + g``, clamped: rows past
        ``N`` read row ``N - 1``, never stored; words ``4 c + wd`` of chunk 0), the scale row offsets ``[NW, 2, 8,
        4]`` and each thread's first word ``4 c`` (groups shorter than a chunk give it its own scale)."""
        NW: gl.constexpr = R // 16
        LS: gl.constexpr = gl.SliceLayout(4, LW)
        rows_w = gl.minimum(t * R + 16 * _iota(NW, LW, 5, 0) + 8 * _iota(2, LW, 5, 1) + _iota(8, LW, 5, 2), N - 1)
        w_base = w_ptr + rows_w * stride_wn + 4 * _iota(4, LW, 5, 3) + _iota(4, LW, 5, 4)
        rows_s = gl.minimum(t * R + 16 * _iota(NW, LS, 4, 0) + 8 * _iota(2, LS, 4, 1) + _iota(8, LS, 4, 2), N - 1)
        return w_base, rows_s * scale_row_stride, 4 * _iota(4, LS, 4, 3)

    @gluon.jit
    def _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, chunk, ok, GROUP_W: gl.constexpr,
                 group_step):
        """Chunk ``chunk``'s words ``[NW, 2, 8, 4, 4]`` and float32 scales ``[NW, 2, 8, 4]`` (thread ``c``'s: its
        words ``s_words = 4 c`` on share one group), zeros where ``ok`` is false (past the program's last chunk).
        uint8 scales are double-quantized: ``map[code] * absmax[i // 256] + offset``."""
        w = gl.load(w_base + _CW * chunk, mask=ok, other=0)
        index = s_rows + ((_CW * chunk + s_words) // GROUP_W) * group_step
        if s_ptr.dtype.element_ty == gl.uint8:
            code = gl.load(s_ptr + index, mask=ok, other=0).to(gl.int32)
            s = gl.load(dmap_ptr + code) * gl.load(sabs_ptr + index // 256, mask=ok, other=0.0) + gl.load(soff_ptr)
        else:
            s = gl.load(s_ptr + index, mask=ok, other=0.0).to(gl.float32)
        return w, s

    @gluon.jit
    def _w_ring(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start, stop, GROUP_W: gl.constexpr,
                group_step, AHEAD: gl.constexpr):
        """The first ``AHEAD`` (1-3) chunks' ``(words, scales)`` as ``w0, s0, w1, s1, w2, s2`` (slots past
        ``AHEAD`` repeat the first)."""
        w0, s0 = _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start, start < stop, GROUP_W,
                          group_step)
        w1, s1, w2, s2 = w0, s0, w0, s0
        if AHEAD > 1:
            w1, s1 = _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start + 1,
                              start + 1 < stop, GROUP_W, group_step)
        if AHEAD > 2:
            w2, s2 = _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start + 2,
                              start + 2 < stop, GROUP_W, group_step)
        return w0, s0, w1, s1, w2, s2

    @gluon.jit
    def _w_shift(w0, s0, w1, s1, w2, s2, w_new, s_new, AHEAD: gl.constexpr):
        """The ring after chunk ``w0`` is used: the next chunk first, ``w_new`` (``AHEAD`` chunks on) last."""
        if AHEAD == 1:
            return w_new, s_new, w1, s1, w2, s2
        elif AHEAD == 2:
            return w1, s1, w_new, s_new, w2, s2
        else:
            return w1, s1, w2, s2, w_new, s_new

    @gluon.jit
    def _word_halves(w):
        """Words ``[NW, 2, 8, 4, 4 (wd)]`` -> those of words 0, 1 and of words 2, 3, each ``[NW, 2, 8, 4, 2]``: a
        chunk's logical inputs 0..63 and 64..127 (:func:`_a_operand`)."""
        NW: gl.constexpr = w.shape[0]
        return gl.split(gl.permute(gl.reshape(w, [NW, 2, 8, 4, 2, 2]), [0, 1, 2, 3, 5, 4]))

    @gluon.jit
    def _a_operand(w, s, LA: gl.constexpr, BOOK: gl.constexpr, X_BF16: gl.constexpr):
        """Words ``[NW, 2 (hr), 8 (g), 4 (c), WD (wd)]`` and their scales -> the scaled weights ``[16 NW, 32 WD]`` as
        the wgmma's register A operand: row ``16 warp + 8 hr + g``, logical input ``32 wd + 16 p + 8 hk + 2 c +
        e`` (pair ``r = p + 2 hk`` of the decode)."""
        NW: gl.constexpr = w.shape[0]
        s = gl.convert_layout(s, gl.SliceLayout(4, w.type.layout))  # the words' thread mapping (half a chunk too)
        if X_BF16:
            s16 = gl.expand_dims(s.to(gl.bfloat16), 4)
            a0, a1, a2, a3 = _scaled_pairs(w, s16, BOOK, True)
            DT: gl.constexpr = gl.bfloat16
        else:
            s16 = gl.expand_dims(s.to(gl.float16), 4)
            a0, a1, a2, a3 = _scaled_pairs(w, s16, BOOK, False)
            DT: gl.constexpr = gl.float16
        both = gl.join(gl.join(a0, a2), gl.join(a1, a3))  # [NW, hr, g, c, wd, hk, p]
        # pair 16 wd + 8 p + 4 hk + c (wd over the words given: 4, or 2 for half a chunk)
        pairs = gl.reshape(gl.permute(both, [0, 1, 2, 4, 6, 5, 3]), [16 * NW, 16 * w.shape[4]])
        return gl.convert_layout(_halves(pairs, DT), LA)

    @gluon.jit
    def _b_tile(x, DT: gl.constexpr):
        """A chunk's activation pairs ``[MP, 4 (c), 4 (wd), 4 (j)]`` as stored (pair ``j`` = inputs ``32 c + 8 wd +
        2 j``, ``+ 1``) -> ``[MP, 128]`` in the A operand's logical order (``(x[phi], x[phi + 2])`` pairs)."""
        x0, x1, x2, x3 = _last4(x)
        lo0 = _prmt(x0, x1, _B0_SEL)  # p 0, hk 0: inputs 0, 2 of the word
        hi0 = _prmt(x0, x1, _B1_SEL)  # p 0, hk 1: inputs 1, 3
        lo1 = _prmt(x2, x3, _B0_SEL)  # p 1, hk 0: inputs 4, 6
        hi1 = _prmt(x2, x3, _B1_SEL)  # p 1, hk 1: inputs 5, 7
        both = gl.join(gl.join(lo0, hi0), gl.join(lo1, hi1))  # [MP, c, wd, hk, p]
        pairs = gl.reshape(gl.permute(both, [0, 2, 4, 3, 1]), [x.shape[0], 64])
        return _halves(pairs, DT)

    @gluon.jit
    def _gemm_wgmma_kernel(x_ptr, w_ptr, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, b_ptr, y_ptr, part_ptr, sem_ptr,
                           N, M, stride_x, stride_y, stride_wn, scale_row_stride, group_step, chunks_per_split,
                           K_WORDS: gl.constexpr, GROUP_W: gl.constexpr, WG: gl.constexpr, MP: gl.constexpr,
                           X_BF16: gl.constexpr, HAS_BIAS: gl.constexpr, BOOK: gl.constexpr,
                           SPLIT_K: gl.constexpr, AHEAD: gl.constexpr = 1):
        """Program ``(t, k)``: weight rows ``64 WG t ..`` over chunks ``k chunks_per_split ..`` of every activation
        row (``x_ptr`` int32 pairs, ``stride_x`` apart); ``y [M, N]`` (``stride_y``), or with ``SPLIT_K`` > 1 the
        float32 partials ``part [SPLIT_K, M, N]`` summed by the tile's last program (counter ``sem_ptr[t]``).
        ``AHEAD`` (1-3): each chunk's words and scales are loaded that many chunks before its decode."""
        NW: gl.constexpr = 4 * WG
        R: gl.constexpr = 64 * WG
        N_CHUNKS: gl.constexpr = K_WORDS // _CW
        DT: gl.constexpr = gl.bfloat16 if X_BF16 else gl.float16
        LW: gl.constexpr = gl.BlockedLayout([1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [NW, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        LX: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [2, 4, 4, 1], [NW, 1, 1, 1], [3, 2, 1, 0])
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, MP, 16])
        LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        XS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        t = gl.program_id(0)
        split = gl.program_id(1)
        start = split * chunks_per_split
        stop = gl.minimum(start + chunks_per_split, N_CHUNKS)
        w_base, s_rows, s_words = _w_pointers(w_ptr, t, N, stride_wn, scale_row_stride, R, LW)
        # activations: pairs 16 c + 4 wd + j of row m (rows past M read as zeros)
        rows_x = _iota(MP, LX, 4, 0)
        x_base = x_ptr + rows_x * stride_x + 16 * _iota(4, LX, 4, 1) + 4 * _iota(4, LX, 4, 2) + _iota(4, LX, 4, 3)
        x_ok = rows_x < M
        xs = gl.allocate_shared_memory(DT, [2, MP, 128], XS)
        acc = gl.zeros([R, MP], gl.float32, ACC)
        w, s, w1, s1, w2, s2 = _w_ring(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start, stop,
                                       GROUP_W, group_step, AHEAD)
        x = gl.load(x_base + 64 * start, mask=x_ok & (start < stop), other=0)
        for chunk in range(start, stop):
            buf = xs.index((chunk - start) % 2)
            w_n, s_n = _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, chunk + AHEAD,
                                chunk + AHEAD < stop, GROUP_W, group_step)
            x_n = gl.load(x_base + 64 * (chunk + 1), mask=x_ok & (chunk + 1 < stop), other=0)
            buf.store(_b_tile(x, DT))
            fence_async_shared()
            gl.thread_barrier()  # every warp's share of the chunk is in; the other buffer's last wgmma is done
            a = _a_operand(w, s, LA, BOOK, X_BF16)
            acc = warpgroup_mma(a, buf.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            w, s, w1, s1, w2, s2 = _w_shift(w, s, w1, s1, w2, s2, w_n, s_n, AHEAD)
            x = x_n
        _store(acc, b_ptr, y_ptr, part_ptr, sem_ptr, t, split, N, M, stride_y, R, MP, ACC, HAS_BIAS, SPLIT_K)

    @gluon.jit
    def _gemm_wgmma_tma_kernel(x_desc, w_ptr, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, b_ptr, y_ptr, part_ptr, sem_ptr,
                               N, M, stride_y, stride_wn, scale_row_stride, group_step, chunks_per_split,
                               K_WORDS: gl.constexpr, GROUP_W: gl.constexpr, WG: gl.constexpr, MP: gl.constexpr,
                               X_BF16: gl.constexpr, HAS_BIAS: gl.constexpr, BOOK: gl.constexpr,
                               SPLIT_K: gl.constexpr, STAGES: gl.constexpr, AHEAD: gl.constexpr = 1):
        """:func:`_gemm_wgmma_kernel` with the activations already in the fragments' input order
        (:func:`fragment_order`), brought in by TMA: each chunk as two ``[MP, 64]`` boxes (rows past ``M`` zeros)
        into a ring of ``STAGES`` shared-memory slots, each with its mbarrier; no activation passes through
        registers. Each chunk is two wgmmas of 64 inputs (words 0-1, 2-3 of every thread); a slot is refilled
        ``STAGES`` chunks ahead once every warpgroup's wgmma on it is done."""
        NW: gl.constexpr = 4 * WG
        R: gl.constexpr = 64 * WG
        N_CHUNKS: gl.constexpr = K_WORDS // _CW
        LW: gl.constexpr = gl.BlockedLayout([1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [NW, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, MP, 16])
        LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        BOX_BYTES: gl.constexpr = 2 * MP * 64 * 2  # a chunk: two [MP, 64] boxes of 16-bit values
        t = gl.program_id(0)
        split = gl.program_id(1)
        start = split * chunks_per_split
        stop = gl.minimum(start + chunks_per_split, N_CHUNKS)
        w_base, s_rows, s_words = _w_pointers(w_ptr, t, N, stride_wn, scale_row_stride, R, LW)
        xs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, MP, 64], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(STAGES):  # the first STAGES chunks in flight
            ok = start + i < stop
            mbarrier.expect(bars.index(i), BOX_BYTES, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [0, 128 * (start + i)], bars.index(i), xs.index(2 * i), pred=ok)
            tma.async_copy_global_to_shared(x_desc, [0, 128 * (start + i) + 64], bars.index(i), xs.index(2 * i + 1),
                                            pred=ok)
        acc = gl.zeros([R, MP], gl.float32, ACC)
        w, s, w1, s1, w2, s2 = _w_ring(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, start, stop,
                                       GROUP_W, group_step, AHEAD)
        for chunk in range(start, stop):
            slot = (chunk - start) % STAGES
            w_n, s_n = _w_chunk(w_base, s_ptr, sabs_ptr, soff_ptr, dmap_ptr, s_rows, s_words, chunk + AHEAD,
                                chunk + AHEAD < stop, GROUP_W, group_step)
            w_lo, w_hi = _word_halves(w)
            a_lo = _a_operand(w_lo, s, LA, BOOK, X_BF16)
            a_hi = _a_operand(w_hi, s, LA, BOOK, X_BF16)
            mbarrier.wait(bars.index(slot), ((chunk - start) // STAGES) & 1)
            acc = warpgroup_mma(a_lo, xs.index(2 * slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a_hi, xs.index(2 * slot + 1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()  # every warpgroup is done with the slot: refill it STAGES chunks ahead
            nxt = chunk + STAGES
            ok = nxt < stop
            mbarrier.expect(bars.index(slot), BOX_BYTES, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [0, 128 * nxt], bars.index(slot), xs.index(2 * slot), pred=ok)
            tma.async_copy_global_to_shared(x_desc, [0, 128 * nxt + 64], bars.index(slot), xs.index(2 * slot + 1),
                                            pred=ok)
            w, s, w1, s1, w2, s2 = _w_shift(w, s, w1, s1, w2, s2, w_n, s_n, AHEAD)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        _store(acc, b_ptr, y_ptr, part_ptr, sem_ptr, t, split, N, M, stride_y, R, MP, ACC, HAS_BIAS, SPLIT_K)

    @gluon.jit
    def _store(acc, b_ptr, y_ptr, part_ptr, sem_ptr, t, split, N, M, stride_y, R: gl.constexpr, MP: gl.constexpr,
               ACC: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
        """The tile ``acc [R, MP]`` (weight rows x activation rows) to ``y [M, N]``, or split ``split``'s partial,
        the last program of tile ``t`` summing all in the order 0..SPLIT_K-1, adding the bias and resetting the
        counter (as :func:`holdall.kernels.triton_wq4._splitk_store`)."""
        rows = gl.expand_dims(t * R + gl.arange(0, R, layout=gl.SliceLayout(1, ACC)), 1)
        cols = gl.expand_dims(gl.arange(0, MP, layout=gl.SliceLayout(0, ACC)), 0)
        ok = (rows < N) & (cols < M)
        dt: gl.constexpr = y_ptr.dtype.element_ty
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += gl.load(b_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
            gl.store(y_ptr + cols * stride_y + rows, acc.to(dt), mask=ok)
        else:
            gl.store(part_ptr + (split * M + cols) * N + rows, acc, mask=ok, cache_modifier=".cg")
            gl.thread_barrier()  # every thread's partial is stored before the counter says so
            arrived = gl.atomic_add(sem_ptr + t, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = gl.zeros([R, MP], gl.float32, ACC)
                for k in range(SPLIT_K):  # fixed order: the same sum whichever program is last (a loop: unrolled,
                    # every split's partial would be live at once -- 167-191 registers a thread, spills at WG 4)
                    total += gl.load(part_ptr + (k * M + cols) * N + rows, mask=ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += gl.load(b_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
                gl.store(y_ptr + cols * stride_y + rows, total.to(dt), mask=ok)
                gl.atomic_xchg(sem_ptr + t, 0)  # ready for the next launch


TALL_TILES = 128  # 64-row tiles from which the TMA staging wins (11008+ rows; 4096 rows: the register staging)
PROGRAMS_PER_SM = 2.6  # the TMA launches' splits aim at this many programs per SM (172 tiles x 2, 344 x 1)
MAX_ROWS_PAST_END = 16  # TMA boxes reaching further past the activations' last row are slow: PAD them (round 16)
INT_MIN_ROWS = 48  # int codes below TALL_TILES: v3 is as fast or faster at 33-40 rows (round 16)
MIN_ROWS = 17  # fewer rows: the tensor-core GEMV (gluon_mma) or v3
INT_MAX_INPUTS_32 = 4096  # int codes at 17..32 rows: v3 is faster at 11008 inputs (round 16)
LONG_ROW_INPUTS = 8192  # codebooks at 17..32 rows: rows this long take 2 warpgroups x 8 splits (round 16)
_REGISTERS = {"VARIANT": "gluon_wgmma", "WG": 1, "SPLIT_K": 4}  # activations through registers, 4 splits


def gemm_config(p: Plan, m: int, sms: int) -> dict | None:
    """The launch for ``m`` rows where this kernel is the fastest holdall has, else None: 17..64 rows of codebooks
    (NF4 / FP4, double-quantized scales too) and of int sym codes (groups of whole chunks, or one scale per row;
    17..32 rows on rows of up to 4096 inputs, 33..47 on layers of ``TALL_TILES`` tiles, 48..64 on every layer),
    one or two warpgroups of 64 weight rows per program. Measured on an H200 (BENCHMARKS.md rounds 15-16; us):

    * 17..32 rows (the wgmma's N 32): activations through registers (:func:`_config_32`) -- NF4 11008 / 12288 /
      22016 x 4096 on two warpgroups, ~2.6 programs per SM: 26.1-27.1 / 25.9-27.0 / 43.9-45.3 against v3's
      36.7-37.4 / 36.7-37.7 / 67.3-67.5 (bf16 25.0-25.6 / 28.9-29.4 / 45.3-45.9); 4096x11008 on two warpgroups x 8
      splits 25.1-25.5 against 27.3-28.1 (bf16 27.1-27.3); 4096x4096 one warpgroup x 4 splits 13.2-14.2 against
      13.7-14.5; int4 g128 one warpgroup, 2 splits on tall layers: 19.4-19.7 / 19.6-19.9 / 34.7-36.5 against
      23.3-23.7 / 23.3-23.7 / 38.2-40.4, 4 on 4096x4096: 10.9-11.2 against 11.1-11.9. At 11008 inputs int4 keeps
      v3 (18.6-19.2 against 21.4-21.8 with one warpgroup, 19.3-19.7 with two);
    * 33..64 rows on tall layers (``TALL_TILES`` tiles or more): activations by TMA, loads 3 chunks ahead, splits
      for ~2.6 programs per SM -- at 64 rows int4 g128 at 11008 / 12288 / 22016 x 4096: 28.3 / 29.2 / 40.3 against
      v3's 30.5 / 30.5 / 49.6 and bf16's 27.0 / 29.4 / 49.2; NF4 34.6 / 34.9 / 52.5 against 42.6 / 42.9 / 72.7.
      Where more than 16 of the wgmma's 64 rows are past ``m`` the activations are zero-padded to 64 rows first
      (``PAD``): TMA boxes reaching that far past the tensor's end are slow (int4 22016x4096 at 33 rows 40.7 with,
      58.0 without; v3 50.2), at 48+ rows the padding's extra copy costs ~1 us;
    * 33..64 rows on other layers: activations through registers, 4 splits -- 4096x4096 int4 13.8-15.0 (48-64
      rows) against v3's 15.7-16.5, NF4 15.6-16.7 (33-64) against 17.1-19.1; 4096x11008 int4 27.4-29.4 (48-64)
      against 27.2-29.7, NF4 31.9-33.8 against 32.1-34.8. Int codes at 33-40 rows keep v3 there (4096x11008:
      26.6 / 27.1 against 28.2 / 28.7).

    Groups of 32 / 64 int codes and double-quantized int scales run here correctly but were not timed (v3 stays);
    FP4 is NF4's decode with another table."""
    if not MIN_ROWS <= m <= MAX_ROWS or why_not(p) is not None:
        return None
    if p.kind == 0 and (p.double_quant or folds(p)):
        return None
    tiles = -(-p.out_features // 64)
    if _rows_padded(m) <= 32:
        return _config_32(p, tiles, sms)
    if tiles >= TALL_TILES:
        cfg = {"VARIANT": "gluon_wgmma", "WG": 1, "SPLIT_K": max(1, math.ceil(PROGRAMS_PER_SM * sms / tiles)),
               "XTMA": True, "STAGES": 3, "AHEAD": 3}
        return {**cfg, "PAD": True} if _rows_padded(m) - m > MAX_ROWS_PAST_END else cfg
    return None if p.kind == 0 and m < INT_MIN_ROWS else dict(_REGISTERS)


def _config_32(p: Plan, tiles: int, sms: int) -> dict | None:
    """17..32 rows (the wgmma's N 32), activations through registers: int codes on one warpgroup per program (2
    splits on tall layers, 4 on others; none past ``INT_MAX_INPUTS_32`` inputs), codebooks -- whose decode costs
    about twice the instructions -- on two (twice the warps for the same programs): ~2.6 programs per SM on tall
    layers, 8 splits on long rows, else one warpgroup with 4 splits (round 16)."""
    tall = tiles >= TALL_TILES
    if p.kind == 0:
        return None if p.in_features > INT_MAX_INPUTS_32 else {**_REGISTERS, "SPLIT_K": 2 if tall else 4}
    if tall:
        return {**_REGISTERS, "WG": 2, "SPLIT_K": max(1, math.ceil(PROGRAMS_PER_SM * sms / -(-tiles // 2)))}
    return {**_REGISTERS, "WG": 2, "SPLIT_K": 8} if p.in_features >= LONG_ROW_INPUTS else dict(_REGISTERS)


def hopper(device) -> bool:
    """``wgmma`` and this kernel's TMA path exist on sm_90 (Hopper) only: Blackwell GPUs, which pass the Gluon
    GEMV's "9.0 or newer", have another tensor-core instruction set and keep the other kernels."""
    return torch.cuda.get_device_capability(device)[0] == 9


def _rows_padded(m: int) -> int:
    """The wgmma's N for ``m`` activation rows: a power of two, 8..64."""
    return max(8, 1 << (m - 1).bit_length())


def fragment_order(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``x [M, K]`` with each 128-input chunk reordered as the wgmma's A fragments hold the decoded codes: logical
    input ``k = 32 wd + 16 p + 8 hk + 2 c + e`` takes stored input ``32 c + 8 wd + 4 p + 2 e + hk`` (a contiguous
    copy; the TMA kernel then loads the activations straight into the wgmma's operand). ``rows`` > M: zero rows
    appended up to ``rows``."""
    m, k = x.shape
    ordered = x.reshape(m, k // 128, 4, 4, 2, 2, 2).permute(0, 1, 3, 4, 6, 2, 5)
    if rows is None or rows <= m:
        return ordered.reshape(m, k)
    out = x.new_empty(rows, k)
    out[:m].view(ordered.shape).copy_(ordered)
    out[m:].zero_()
    return out


def launch_shape(p: Plan, m: int, cfg: dict) -> tuple[int, int, int, int]:
    """``(WG, MP, chunks per split, splits)`` of a launch: ``cfg`` gives ``WG`` (1, 2, 4) and ``SPLIT_K`` (no
    split left empty); ``MP`` is the rows rounded up to a power of two (the wgmma's N, 8..64)."""
    wg, split_k = int(cfg.get("WG", 2)), int(cfg.get("SPLIT_K", 1))
    if wg not in WARPGROUPS or split_k < 1:
        raise ValueError(f"WG must be one of {WARPGROUPS} and SPLIT_K >= 1; got {cfg}")
    chunks = p.in_features // (CHUNK_WORDS * 8)
    per_split = -(-chunks // split_k)
    return wg, _rows_padded(m), per_split, -(-chunks // per_split)


def gemm(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
         cfg: dict) -> torch.Tensor:
    """``out [M, N] = x W^T + b`` for 1..64 rows ``x [M, K]`` (bf16/fp16, rows contiguous with an even stride) on
    Hopper (``cfg``: ``WG`` warpgroups of 64 weight rows per program, ``SPLIT_K``, ``AHEAD`` chunks of weights
    loaded ahead, ``XTMA`` with ``STAGES``: the activations by TMA, ``PAD``: zero-padded to the wgmma's N rows
    first)."""
    if gl is None:
        raise RuntimeError("the wgmma GEMM needs Triton with Gluon (3.6 or newer) and a Hopper GPU")
    if x.is_cuda and not hopper(x.device):
        raise RuntimeError(f"the wgmma GEMM runs on Hopper (sm_90) GPUs only; this one is sm_"
                           f"{''.join(map(str, torch.cuda.get_device_capability(x.device)))}: leave the config to "
                           f"the dispatch (triton_wq4.gemm with config=None), which picks another kernel there")
    m = check_rows(p, x, out, "the wgmma GEMM")
    wg, mp, per_split, split_k = launch_shape(p, m, cfg)
    tiles = -(-p.out_features // (64 * wg))
    from .triton_wq4 import _tile_counters

    part = torch.empty(split_k, m, p.out_features, device=x.device, dtype=torch.float32) if split_k > 1 else out
    counters = _tile_counters(x.device, tiles) if split_k > 1 else out
    fmt = _format(p)
    fmt.pop("FOLD")
    ahead = int(cfg.get("AHEAD", 1))
    if ahead not in (1, 2, 3):
        raise ValueError(f"AHEAD (chunks of weights loaded ahead) must be 1, 2 or 3; got {cfg}")
    bf16 = x.dtype == torch.bfloat16
    if cfg.get("XTMA"):  # the activations reordered once, then brought in by TMA
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        desc = TensorDescriptor.from_tensor(fragment_order(x, mp if cfg.get("PAD") else None), [mp, 64], layout)
        _gemm_wgmma_tma_kernel[(tiles, split_k)](
            desc, *_weights(ops), bias if bias is not None else ops.scale, out, part, counters, p.out_features, m,
            out.stride(0), ops.words.stride(0), p.scale_row_stride, p.group_step, per_split, WG=wg, MP=mp,
            X_BF16=bf16, HAS_BIAS=bias is not None, SPLIT_K=split_k, STAGES=int(cfg.get("STAGES", 3)), AHEAD=ahead,
            **fmt,
            num_warps=4 * wg,
        )
        return out
    _gemm_wgmma_kernel[(tiles, split_k)](
        x.view(torch.int32), *_weights(ops), bias if bias is not None else ops.scale, out, part, counters,
        p.out_features, m, x.stride(0) // 2, out.stride(0), ops.words.stride(0), p.scale_row_stride, p.group_step,
        per_split, WG=wg, MP=mp, X_BF16=bf16, HAS_BIAS=bias is not None, SPLIT_K=split_k, AHEAD=ahead,
        **fmt, num_warps=4 * wg,
    )
    return out


__all__ = ["BOOKS", "MAX_ROWS", "WARPGROUPS", "fragment_order", "gemm", "gemm_config", "hopper", "launch_shape"]
