"""The one-row 4-bit GEMV in Gluon, Triton's explicit-layout dialect (issue 6, round 10 of the kernels).

Why a second one-row kernel: Nsight Compute on the TMA kernel (``triton_wq4._gemv_tma_kernel``, H200, Llama-2-7B
``down_proj``) showed it issue-bound, not memory-bound: 5.1 thread-instructions per 4-bit code against the 2 the
dot product needs (one PRMT decode + one FMA), spent on the layout Triton chose for it -- weights read back from
shared memory with ``ldmatrix`` (52% of the shared wavefronts excess from bank conflicts), three barriers per
iteration for the TMA pipeline, and eight scattered scale loads per thread per 64 codes. Gluon lets the kernel
name its layout instead, so this one is written around what a thread does:

* a thread holds ``R`` weight rows x 4 consecutive int32 words (32 codes, always inside one group since groups
  are >= 4 words), loaded straight from global memory as one 16-byte vector per row, coalesced along the row
  across the warp's 32 lanes (512 contiguous bytes per row per warp); ``WK`` warps split the row further;
* the activations of those 4 words (32 bf16/fp16 values) arrive as four 16-byte vectors, are converted once and
  serve all ``R`` rows; the codes become the exact float32 ``128 + q`` with one PRMT each
  (:func:`holdall.kernels.ptx.nibbles_f32_asm`) and enter one chain of FMAs per row that starts from the
  words' offset ``-136 * sum(x)`` (symmetric codes store ``q + 8``), so a row's 32 codes cost 32 PRMT + 32 FMA
  and one more FMA for the group scale;
* ``in_features`` is a compile-time constant, so the loop over the row is unrolled: every load address is a
  register plus an immediate and ptxas is free to issue the next words' loads under this word's arithmetic;
  a row length that is not a whole number of tiles ends in one masked tile;
* one reduction across lanes and warps per row tile at the end, then the same epilogues as the TMA kernel:
  bias (and the residual folded into it), an RMSNorm split over producer and consumer (``NORM_OUT`` /
  ``NORM_IN``), and the SiLU-gated MLP's ``silu(gate) * up`` for a stacked gate/up layer (``GLU``: a thread's
  rows interleave gate row ``i`` and its up row ``i + I``).

Programmatic dependent launch (round 11, ``PDL``; only for GEMVs chained in a decode step, ``chained=True``): a
decode step is a chain of kernels, each reading what the one before wrote, but no kernel of it writes a GEMV's
weights and scales -- so the kernel is launched while the previous one still runs, loads ``PDL_TILES`` row
tiles' weights into registers (``PDL_L2``: asks for the rest to come into L2), and only then waits
(``griddepcontrol.wait``) before it reads its input or the squares and before any store; it then lets the next
kernel start (``griddepcontrol.launch_dependents``). The outputs are bit for bit those of a plain launch (only the
loads move); what it saves is each kernel's ramp -- its first DRAM round trips happen under the previous kernel's
tail. Round 8 tried PDL with the wait before the first load and measured nothing.

With ``XQ8`` (W4A8) each word's activations are rounded to int8 exactly as the TMA kernel rounds them and the
codes multiplied by DP4A, or (``XIN8``) read as the int8 words a ``Q8_OUT`` producer wrote; the elementwise
pieces (16-bit unpacking, code decode, int8 rounding, DP4A dot) are ``triton_wq4``'s own helpers.

Compiled for sm_90 (``bench/sass_stats.py gemv_gluon``): 3.2-3.6 thread-instructions per code with float
activations against the TMA kernel's 4.6-5.1, 2.4 rounding int8 in the kernel, 1.7 reading handed int8 words.
On an H200 (BENCHMARKS.md rounds 10-11): 4096x11008 in 10.5 us (2.62x bf16 cuBLAS; TMA kernel 13.5), 8.1 us
with int8 activations (3.39x); the int4 7B decode step at 48% of the copy roofline, 60% with int8 activations.
Int symmetric codes, group-wise or per-channel scales without double quantization; everything else keeps the
Triton kernels (:func:`holdall.kernels.triton_wq4.gemv_config` chooses). The plain-torch reference is
:func:`holdall.kernels.packed.reference_linear`; ``tests/test_kernels.py`` compares them on the device.
"""

from __future__ import annotations

import functools
import os

import torch

from . import ptx
from .packed import CODES_PER_WORD, Operands, Plan

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every layer
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = None

#: words per thread along a row: one 16-byte load
WORDS_PER_THREAD = 4


#: the Triton the kernel was written and tested against (Gluon is experimental: its API moves between releases)
MIN_TRITON = (3, 6)


def version_tuple(text: str) -> tuple[int, int]:
    """``"3.6.0"`` / ``"3.10.1+git1a2b"`` / ``"3.5rc1"`` -> ``(major, minor)``."""
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    digits = "".join(ch for ch in minor[:2] if ch.isdigit())
    return int(major), int(digits or 0)


def _triton_version() -> tuple[int, int]:
    import triton

    return version_tuple(triton.__version__)


@functools.lru_cache(maxsize=None)
def available(device_index: int) -> bool:
    """Gluon imports from a Triton >= 3.6 and the GPU is an NVIDIA Hopper or newer. The kernel itself needs
    nothing past Ampere (vector loads, PRMT, DP4A), but it has only been run and tested on an H200, so older GPUs
    keep the Triton kernels."""
    return (gl is not None and _triton_version() >= MIN_TRITON and torch.version.hip is None
            and torch.cuda.get_device_capability(device_index) >= (9, 0))


def enabled() -> bool:
    """The Gluon GEMV is the default where it can run, unless ``HOLDALL_GLUON=0`` (A/B runs against the Triton
    kernels: ``bench/gpu_decode.py`` times both)."""
    return os.environ.get("HOLDALL_GLUON", "1") != "0"


def pdl_enabled() -> bool:
    """Programmatic dependent launch is on unless ``HOLDALL_PDL=0`` (A/B runs)."""
    return os.environ.get("HOLDALL_PDL", "1") != "0"


def why_not(p: Plan, int8_activations: bool = False) -> str | None:
    """Why this kernel cannot take a layer of plan ``p`` (None when it can); ``int8_activations``: with the
    codes multiplied by int8-rounded activations (``XQ8``), which it does for the same layers."""
    if p.kind != 0:
        return "it decodes symmetric int codes only (asymmetric zero points and codebooks keep the Triton kernels)"
    if p.double_quant:
        return "double-quantized scales are decoded by the Triton kernels"
    if p.in_features % p.group or p.in_features % (WORDS_PER_THREAD * CODES_PER_WORD):
        return f"in_features {p.in_features} is not a whole number of groups of 4-word thread tiles"
    return None


if gl is not None:
    # the elementwise pieces are the TMA kernel's own @triton.jit helpers (a Gluon kernel compiles what it calls
    # with its own semantics): one definition of the int8 rounding, the DP4A dot and the 16-bit unpacking
    from .triton_wq4 import _codes_f32, _dot_s8, _fma_chain, _pow2_scales, _quantize_word, _s8_bits, _unpack_pair

    _MAGIC_F32 = gl.constexpr(ptx.MAGIC_F32)  # 1.5 * 2**23: + it rounds to an integer in the low mantissa bits
    _MAGIC_INT = gl.constexpr(ptx.MAGIC_INT)  # ... whose float bits, read as an int, are _MAGIC_INT + the integer

    @gluon.jit
    def _quantize_pairs(p0, p1, p2, p3, X_BF16: gl.constexpr):
        """A word's 8 activations (4 packed pairs) as int8 times one power-of-two scale: ``(odd, even, total,
        scale)`` -- the odd inputs' int8 packed in one int32 (the weight words' low nibbles are their codes),
        the even ones' in another, their int sum, the scale; the TMA kernel's ``XQ8`` rounding, bit for bit."""
        x0, x1 = _unpack_pair(p0, X_BF16)
        x2, x3 = _unpack_pair(p1, X_BF16)
        x4, x5 = _unpack_pair(p2, X_BF16)
        x6, x7 = _unpack_pair(p3, X_BF16)
        return _quantize_word(x0, x1, x2, x3, x4, x5, x6, x7, True)

    @gluon.jit
    def _int8_part(part, w, odd, even, total, scale):
        """``part + scale * sum_c (code_c - 8) x8_c`` for the words ``w [R, KQ]`` and their int8 activations
        (``[1, KQ]``): the dot exact in int32 (the codes' offset folded into the DP4A's start value through
        the float32 magic ``1.5 * 2**23``), then scaled: 5 + 2 instructions per word and row."""
        d = _dot_s8(w, odd, even, _MAGIC_INT - 8 * total, True).to(gl.float32, bitcast=True) - _MAGIC_F32
        return d * scale + part

    @gluon.jit
    def _split4(t):
        """``t [..., 2, 2]`` -> its four ``[...]`` slices of flat last-two-dims index 0, 1, 2, 3."""
        a, b = gl.split(t)  # last index 0 / 1
        t0, t2 = gl.split(a)
        t1, t3 = gl.split(b)
        return t0, t1, t2, t3

    @gluon.jit
    def _word_sum(p0, p1, p2, p3, X_BF16: gl.constexpr):
        """Sum of a word's 8 activations (4 packed pairs)."""
        x0, x1 = _unpack_pair(p0, X_BF16)
        x2, x3 = _unpack_pair(p1, X_BF16)
        x4, x5 = _unpack_pair(p2, X_BF16)
        x6, x7 = _unpack_pair(p3, X_BF16)
        return ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))

    @gluon.jit
    def _word_dot(part, w, p0, p1, p2, p3, X_BF16: gl.constexpr):
        """``part + sum_c (128 + q_c) x_c`` over the 8 codes of each word of ``w [R, KQ]`` and its activations
        (``p0..p3 [1, KQ]``, packed pairs): 8 PRMT + 8 FMA per word and row."""
        x0, x1 = _unpack_pair(p0, X_BF16)
        x2, x3 = _unpack_pair(p1, X_BF16)
        x4, x5 = _unpack_pair(p2, X_BF16)
        x6, x7 = _unpack_pair(p3, X_BF16)
        return _fma_chain(part, _codes_f32(w, True), (x0, x1, x2, x3, x4, x5, x6, x7), 0)

    @gluon.jit
    def _pairs_as(t, XL: gl.constexpr):
        """A ``[KQ]`` tensor of packed pairs in the weight tile's column layout, as ``[1, KQ]`` (no data moves:
        the lane that holds weight column ``q`` already holds activation quad ``q``)."""
        return gl.expand_dims(gl.convert_layout(t, XL, assert_trivial=True), 0)

    @gluon.jit
    def _weights(wp, sp, kw3, kq2, k0: gl.constexpr, group_step, K_WORDS: gl.constexpr, GROUP_W: gl.constexpr,
                 MASK: gl.constexpr):
        """The weight tile ``[R, KQ, 4]`` of the words ``k0 + 4 q + j`` of every row (16-byte rows per thread;
        ``wp`` points at the row starts plus ``4 q + j``) and its group scales ``[R, KQ]`` (``sp`` at the first
        group of each quad). ``MASK``: the row's last, partial tile (words past the row read as 0). ``k0`` is a
        constant and a multiple of the group: every offset is an immediate."""
        if MASK:
            w = gl.load(wp + k0, mask=(kw3 + k0) < K_WORDS, other=0)
            s = gl.load(sp + (k0 // GROUP_W) * group_step, mask=(k0 + 4 * kq2) < K_WORDS, other=0.0)
        else:
            w = gl.load(wp + k0)
            s = gl.load(sp + (k0 // GROUP_W) * group_step)
        return w, s

    @gluon.jit
    def _tile(acc, w, s, xq, xsq, kx, k0: gl.constexpr, K_WORDS: gl.constexpr, X_BF16: gl.constexpr,
              MASK: gl.constexpr, XQ8: gl.constexpr, XIN8: gl.constexpr):
        """``acc [R, KQ] +=`` scale x dot of the weight tile ``w [R, KQ, 4]`` (scales ``s [R, KQ]``, from
        :func:`_weights`) and its activations (``xq``: ``[KQ * 16]`` float pairs, 16 consecutive per thread;
        with ``XIN8`` ``[KQ * 8]`` int8 word halves and ``xsq`` their ``[KQ * 4]`` scales). ``XQ8``: int codes
        times the activations rounded to int8 per word (W4A8, DP4A), rounded here or read (``XIN8``)."""
        R: gl.constexpr = w.shape[0]
        KQ: gl.constexpr = w.shape[1]
        PAIRS: gl.constexpr = 8 if XIN8 else 16  # int32 activation entries per quad
        if MASK:
            xp = gl.load(xq + PAIRS // 4 * k0, mask=(kx + PAIRS // 4 * k0) < PAIRS // 4 * K_WORDS, other=0)
        else:
            xp = gl.load(xq + PAIRS // 4 * k0)
        w0, w1, w2, w3 = _split4(gl.reshape(w, [R, KQ, 2, 2]))  # words j = 0..3 of each thread's quad: [R, KQ]
        XL: gl.constexpr = gl.SliceLayout(0, w0.type.layout)
        if XIN8:  # entry e of word j: [q, j // 2, j % 2, e], e = 0 the odd inputs' int8, 1 the even ones'
            part = _xin8_part(w0, w1, w2, w3, xp, xsq, k0, K_WORDS, XL, MASK)
        else:
            part = _float_part(w0, w1, w2, w3, xp, XL, X_BF16, XQ8)
        return acc + part * s.to(gl.float32)

    @gluon.jit
    def _prefetch_l2(ptrs):
        """Ask for the lines at ``ptrs`` to be brought into L2 (no register is written)."""
        gl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _wait_for_producer():
        """Programmatic dependent launch (Hopper): block until the previous kernel in the stream has finished
        and its writes are visible, then let the next kernel's programs start (they may load their weights
        while this one runs). A no-op when the launch did not ask for it."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _xin8_part(w0, w1, w2, w3, xp, xsq, k0: gl.constexpr, K_WORDS: gl.constexpr, XL: gl.constexpr,
                   MASK: gl.constexpr):
        """:func:`_tile`'s scaled-by-activation dot products ``[R, KQ]`` from int8 words a producer wrote
        (``xp [KQ * 8]``: per word its odd inputs' int8, then its even ones'; scales at ``xsq``)."""
        KQ: gl.constexpr = w0.shape[1]
        odd4, even4 = gl.split(gl.reshape(xp, [KQ, 2, 2, 2]))
        odd = _split4(odd4)
        even = _split4(even4)
        if MASK:
            xsc = gl.load(xsq + k0, mask=(gl.arange(0, KQ * 4, layout=xsq.type.layout) + k0) < K_WORDS, other=0.0)
        else:
            xsc = gl.load(xsq + k0)
        sc = _split4(gl.reshape(xsc, [KQ, 2, 2]))
        ws = (w0, w1, w2, w3)
        part = gl.zeros_like(w0).to(gl.float32)
        for j in gl.static_range(4):
            o = _pairs_as(odd[j], XL)
            e = _pairs_as(even[j], XL)
            total = _dot_s8(gl.full(o.shape, 0x11111111, gl.int32, o.type.layout), o, e, gl.zeros_like(o), True)
            part = _int8_part(part, ws[j], o, e, total, _pairs_as(sc[j], XL))
        return part

    @gluon.jit
    def _float_part(w0, w1, w2, w3, xp, XL: gl.constexpr, X_BF16: gl.constexpr, XQ8: gl.constexpr):
        """:func:`_tile`'s dot products ``[R, KQ]`` from the float activations (``xp [KQ * 16]`` pairs): in
        float32, or (``XQ8``) rounded here to int8 per word and multiplied by DP4A."""
        KQ: gl.constexpr = w0.shape[1]
        # pair p of word j sits at [q, j // 2, j % 2, p // 2, p % 2]
        xa, xb = gl.split(gl.reshape(xp, [KQ, 2, 2, 2, 2]))  # p % 2 = 0 / 1
        xa0, xa2 = gl.split(xa)  # p = 0, 2: [KQ, 2, 2] by word
        xb1, xb3 = gl.split(xb)  # p = 1, 3
        a0 = _split4(xa0)
        a2 = _split4(xa2)
        b1 = _split4(xb1)
        b3 = _split4(xb3)
        if XQ8:
            ws = (w0, w1, w2, w3)
            part = gl.zeros_like(w0).to(gl.float32)
            for j in gl.static_range(4):
                odd, even, total, scale = _quantize_pairs(_pairs_as(a0[j], XL), _pairs_as(b1[j], XL),
                                                         _pairs_as(a2[j], XL), _pairs_as(b3[j], XL), X_BF16)
                part = _int8_part(part, ws[j], odd, even, total, scale)
        else:
            part = _word_sum(_pairs_as(a0[0], XL), _pairs_as(b1[0], XL), _pairs_as(a2[0], XL),
                             _pairs_as(b3[0], XL), X_BF16)
            for j in gl.static_range(1, 4):
                part += _word_sum(_pairs_as(a0[j], XL), _pairs_as(b1[j], XL), _pairs_as(a2[j], XL),
                                  _pairs_as(b3[j], XL), X_BF16)
            part = part * -136.0  # symmetric codes store q + 8: sum (128 + code) x - 136 sum x = sum q x
            part = _word_dot(part, w0, _pairs_as(a0[0], XL), _pairs_as(b1[0], XL), _pairs_as(a2[0], XL),
                             _pairs_as(b3[0], XL), X_BF16)
            part = _word_dot(part, w1, _pairs_as(a0[1], XL), _pairs_as(b1[1], XL), _pairs_as(a2[1], XL),
                             _pairs_as(b3[1], XL), X_BF16)
            part = _word_dot(part, w2, _pairs_as(a0[2], XL), _pairs_as(b1[2], XL), _pairs_as(a2[2], XL),
                             _pairs_as(b3[2], XL), X_BF16)
            part = _word_dot(part, w3, _pairs_as(a0[3], XL), _pairs_as(b1[3], XL), _pairs_as(a2[3], XL),
                             _pairs_as(b3[3], XL), X_BF16)
        return part

    @gluon.jit
    def _store_int8_words(h, t, q_out_ptr, qs_out_ptr, R: gl.constexpr):
        """Rows ``t R .. t R + R`` of ``h`` (float32 ``[R]``, as stored) as the int8 words of ``XIN8``: per word of
        8 rows, ``q_out[2 w]`` the odd rows' int8, ``q_out[2 w + 1]`` the even rows', ``qs_out[w]`` the scale
        (:func:`holdall.kernels.packed.pack_s8_words` of :func:`holdall.kernels.packed.quantize_activations_s8`)."""
        even, odd = gl.split(gl.reshape(h, [R // 8, 4, 2]))  # row 8 w + 2 i + e
        amax = gl.maximum(gl.max(gl.abs(even), axis=1), gl.max(gl.abs(odd), axis=1))  # [R / 8]
        inv, scale = _pow2_scales(amax)
        inv2 = gl.expand_dims(inv, 1)
        shifts = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, even.type.layout)) * 8, 0)
        q_even = gl.sum(_s8_bits(gl.minimum(even * inv2, 127.0)) << shifts, axis=1)  # disjoint bytes: sum = OR
        q_odd = gl.sum(_s8_bits(gl.minimum(odd * inv2, 127.0)) << shifts, axis=1)
        words = t * (R // 8) + gl.arange(0, R // 8, layout=amax.type.layout)
        gl.store(q_out_ptr + 2 * words, q_odd)
        gl.store(q_out_ptr + 2 * words + 1, q_even)
        gl.store(qs_out_ptr + words, scale)

    @gluon.jit
    def _gemv_gluon_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, sq_in_ptr, n_sq, eps, nw_ptr, h_ptr, sq_out_ptr,
                           xs_ptr, q_out_ptr, qs_out_ptr, N, n_half, stride_wn, scale_row_stride, group_step,
                           K_WORDS: gl.constexpr, GROUP_W: gl.constexpr, R: gl.constexpr, WK: gl.constexpr,
                           X_BF16: gl.constexpr, HAS_BIAS: gl.constexpr, NORM_IN: gl.constexpr,
                           SQ_BLOCK: gl.constexpr, NORM_OUT: gl.constexpr, GLU: gl.constexpr,
                           XQ8: gl.constexpr = False, XIN8: gl.constexpr = False, Q8_OUT: gl.constexpr = False,
                           PDL: gl.constexpr = False, PDL_TILES: gl.constexpr = 0, PDL_L2: gl.constexpr = False):
        """Rows of program ``t``: ``t R .. t R + R`` (``GLU``: gate rows ``t R / 2 + i`` interleaved with their
        up rows ``n_half`` further on). ``x_ptr`` is the activation row as int32 pairs (``XIN8``: int8 words,
        ``xs_ptr`` their scales); ``y`` one row. ``Q8_OUT`` (with ``NORM_OUT``, ``R`` a multiple of 8, whole
        row tiles): also write ``h`` as int8 words and scales for an ``XIN8`` consumer, rounded as ``XQ8``
        would round it."""
        LW: gl.constexpr = gl.BlockedLayout([R, 1, 4], [1, 32, 1], [1, WK, 1], [2, 1, 0])  # [rows, quads, words]
        PAIRS: gl.constexpr = 8 if XIN8 else 16  # a quad's activation int32s per thread: 16 float pairs or 8 int8
        LX: gl.constexpr = gl.BlockedLayout([PAIRS], [32], [WK], [0])
        KQ: gl.constexpr = 32 * WK  # quads (4-word thread tiles) per tile
        KW: gl.constexpr = 4 * KQ  # words per tile
        t = gl.program_id(0)
        rows, ok = _tile_rows(gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW))), t, R, N, n_half, GLU)
        rw = gl.expand_dims(gl.expand_dims(rows, 1), 2)
        qw = gl.expand_dims(gl.expand_dims(gl.arange(0, KQ, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW))), 0), 2)
        jw = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0), 1)
        kw3 = qw * 4 + jw  # [1, KQ, 4] word index in the tile
        w_off = rw * stride_wn + kw3  # [R, KQ, 4]
        kx = gl.arange(0, KQ * PAIRS, layout=LX)  # activation int32 index in the tile
        xsq = xs_ptr + gl.arange(0, KQ * 4, layout=gl.BlockedLayout([4], [32], [WK], [0]))  # XIN8: word scales
        probe = gl.split(gl.split(gl.reshape(gl.full([R, KQ, 4], 0, gl.int32, LW), [R, KQ, 2, 2]))[0])[0]
        LA: gl.constexpr = probe.type.layout  # the [R, KQ] layout the dot products come out in
        rows2 = gl.expand_dims(gl.convert_layout(rows, gl.SliceLayout(1, LA)), 1)
        kq2 = gl.expand_dims(gl.arange(0, KQ, layout=gl.SliceLayout(0, LA)), 0)
        wp = w_ptr + w_off
        xq = x_ptr + kx
        sp = s_ptr + (rows2 * scale_row_stride + ((4 * kq2) // GROUP_W) * group_step)  # [R, KQ]
        N_FULL: gl.constexpr = K_WORDS // KW
        N_TILES: gl.constexpr = N_FULL + (1 if N_FULL * KW < K_WORDS else 0)
        PRE: gl.constexpr = min(PDL_TILES, N_TILES) if PDL else 0  # tiles in registers before the wait
        if PDL:  # weights and scales never change during a decode step: read them before waiting for the input
            if PRE > 0:
                w0, s0 = _weights(wp, sp, kw3, kq2, 0, group_step, K_WORDS, GROUP_W, N_FULL == 0)
            if PRE > 1:
                w1, s1 = _weights(wp, sp, kw3, kq2, KW, group_step, K_WORDS, GROUP_W, N_FULL == 1)
            if PDL_L2:  # the rest of the rows on their way into L2 (no registers held)
                rows_p = gl.expand_dims(gl.convert_layout(rows, gl.SliceLayout(1, LA)), 1)
                row_starts = w_ptr + (rows_p * stride_wn + 4 * kq2)  # [R, KQ]: a thread's 16 bytes of each row
                for it in gl.static_range(PRE, N_TILES):
                    if it < N_FULL:
                        _prefetch_l2(row_starts + it * KW)
                    else:  # the last tile's quads past the row end would prefetch the next row: clamp them
                        _prefetch_l2(row_starts + gl.minimum(it * KW + 4 * kq2, K_WORDS - 4) - 4 * kq2)
            _wait_for_producer()  # x, the squares and every store come after it
        squares = _squares_in(sq_in_ptr, n_sq, SQ_BLOCK, WK, NORM_IN)
        acc = gl.zeros([R, KQ], gl.float32, LA)
        for it in gl.static_range(N_TILES):
            if it < PRE:
                if it == 0:
                    w, s = w0, s0
                else:
                    w, s = w1, s1
            else:
                w, s = _weights(wp, sp, kw3, kq2, it * KW, group_step, K_WORDS, GROUP_W, it >= N_FULL)
            acc = _tile(acc, w, s, xq, xsq, kx, it * KW, K_WORDS, X_BF16, it >= N_FULL, XQ8, XIN8)
        y = gl.sum(acc, axis=1)  # [R]: every thread ends up with the tile's R sums
        YL: gl.constexpr = y.type.layout
        _epilogue(y, gl.convert_layout(rows, YL), gl.convert_layout(ok, YL), t, squares, eps, b_ptr, y_ptr, n_half,
                  nw_ptr, h_ptr, sq_out_ptr, q_out_ptr, qs_out_ptr, K_WORDS, HAS_BIAS, NORM_IN, NORM_OUT, GLU,
                  Q8_OUT)

    @gluon.jit
    def _tile_rows(ri, t, R: gl.constexpr, N, n_half, GLU: gl.constexpr):
        """Program ``t``'s weight rows for tile positions ``ri`` (``0..R``) and where they exist; the rows are
        clamped into the matrix for the loads (the stores are masked). ``GLU``: position ``2 i + h`` is gate row
        ``t R / 2 + i`` (``h = 0``) or its up row ``n_half`` further on."""
        if GLU:
            rows = t * (R // 2) + ri // 2 + (ri % 2) * n_half
            ok = t * (R // 2) + ri // 2 < n_half
        else:
            rows = t * R + ri
            ok = rows < N
        return gl.where(ok, rows, 0), ok

    @gluon.jit
    def _squares_in(sq_in_ptr, n_sq, SQ_BLOCK: gl.constexpr, WK: gl.constexpr, NORM_IN: gl.constexpr):
        """The producer's partial sums of squares, summed in a fixed order (0.0 without ``NORM_IN``)."""
        squares = 0.0
        if NORM_IN:
            rs = gl.arange(0, SQ_BLOCK, layout=gl.BlockedLayout([1], [32], [WK], [0]))
            squares = gl.sum(gl.load(sq_in_ptr + rs, mask=rs < n_sq, other=0.0), axis=0)
        return squares

    @gluon.jit
    def _epilogue(y, rows_y, ok_y, t, squares, eps, b_ptr, y_ptr, n_half, nw_ptr, h_ptr, sq_out_ptr, q_out_ptr,
                  qs_out_ptr, K_WORDS: gl.constexpr, HAS_BIAS: gl.constexpr, NORM_IN: gl.constexpr,
                  NORM_OUT: gl.constexpr, GLU: gl.constexpr, Q8_OUT: gl.constexpr):
        """Program ``t``'s float32 row sums ``y [R]`` (weight rows ``rows_y``, ``ok_y`` where they exist) to the
        outputs: ``NORM_IN``'s ``1 / rms``, the bias (and residual), then either ``silu(gate) * up`` of the
        interleaved gate/up rows (``GLU``) or the row itself and ``NORM_OUT``'s pieces (``h = y * w``, the
        tile's sum of squares, and with ``Q8_OUT`` ``h`` as int8 words)."""
        R: gl.constexpr = y.shape[0]
        if NORM_IN:
            y = y * gl.rsqrt(squares / (K_WORDS * 8) + eps)
        if HAS_BIAS:
            y += gl.load(b_ptr + rows_y).to(gl.float32)
        dt: gl.constexpr = y_ptr.dtype.element_ty
        if GLU:  # row 2 i + h: gate (h = 0) or up (h = 1) of output t R / 2 + i; rounded as F.silu(gate) * up
            g, u = gl.split(gl.reshape(y.to(dt).to(gl.float32), [R // 2, 2]))
            act = (g / (1.0 + gl.exp(-g))).to(dt).to(gl.float32)
            oi = t * (R // 2) + gl.arange(0, R // 2, layout=g.type.layout)
            gl.store(y_ptr + oi, (act * u).to(dt), mask=oi < n_half)
        else:
            y_out = y.to(dt)
            gl.store(y_ptr + rows_y, y_out, mask=ok_y)
            if NORM_OUT:  # the next norm's pieces, from the value as stored (the residual stream's rounding)
                yf = gl.where(ok_y, y_out.to(gl.float32), 0.0)
                nw = gl.load(nw_ptr + rows_y).to(gl.float32)
                h = (yf * nw).to(h_ptr.dtype.element_ty)
                gl.store(h_ptr + rows_y, h, mask=ok_y)
                gl.store(sq_out_ptr + t, gl.sum(yf * yf, axis=0))
                if Q8_OUT:
                    _store_int8_words(h.to(gl.float32), t, q_out_ptr, qs_out_ptr, R)


def gemv_config(p: Plan, int8_activations: bool = False, chained: bool = False) -> dict:
    """The tiling (rows per thread ``BLOCK_N`` = rows per program, warps ``WK`` along the row) and how it is
    launched, from the round-11 sweep on an H200 (``bench/gluon_sweep.py``, calls back to back; BENCHMARKS.md,
    us). ``chained``: the launch is one link of a chain in which no kernel writes this layer's weights (a decode
    step: :class:`holdall.serving.static_decode.StaticDecoder`), so it may use programmatic dependent launch
    (``PDL``, unless ``HOLDALL_PDL=0``) and read ``PDL_TILES`` row tiles of its weights before it waits for the
    previous kernel. A general call waits for the kernel before it as usual (that kernel may have written the
    weights), so it launches plainly.

    * float activations: long rows (>= 8192 inputs) 8 rows x 4 warps, chained with two tiles loaded early
      (4096x11008: 10.45 against 10.84 launched plainly); shorter rows 8 x 2, chained with none (4096x4096 4.67
      against 5.36, 22016x4096 15.98 against 16.79, 12288x4096 10.14 against 16 x 2 plainly, round 10's choice,
      9.95). More tiles early hold more registers (128 -> 152-254) and lost wherever programs are many
      (22016x4096 at two tiles: 17.32), and 16-row tiles lost with any PDL (12288x4096: 11.9-12.9);
    * int8 activations (``XQ8``): 8 x 2, chained with one tile early (4096x11008 8.06, 11008x4096 7.85,
      4096x4096 3.79, 22016x4096 13.46, 12288x4096 8.28; plainly 9.26 / 9.37 / 5.70 / 15.78 / 10.03).
    """
    if int8_activations:
        block_n, wk, tiles = 8, 2, 1
    elif p.in_features >= 8192:
        block_n, wk, tiles = 8, 4, 2
    else:
        block_n, wk, tiles = 8, 2, 0
    pdl = chained and pdl_enabled()
    return {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk, "XQ8": int8_activations, "PDL": pdl,
            "PDL_TILES": tiles if pdl else 0, "PDL_L2": False}


def programs_for(p: Plan, out: torch.Tensor, rows: int, glu: bool, norm_out) -> tuple[int, int]:
    """``(n_half, programs)`` of a one-row launch whose programs own ``rows`` tile positions: with ``glu`` each
    holds ``rows / 2`` gate rows and their up rows (``n_half`` = outputs = half the layer's rows), checked."""
    n_half, tile_rows = p.out_features, rows
    if glu:
        n_half, tile_rows = p.out_features // 2, rows // 2
        if p.out_features % 2 or norm_out is not None:
            raise ValueError("glu needs a stacked [gate; up] layer (even rows) and no norm_out")
        if out.numel() != n_half:
            raise ValueError(f"glu writes silu(gate) * up: out needs {n_half} elements, got {out.numel()}")
    return n_half, -(-n_half // tile_rows)


def gemv(ops: Operands, p: Plan, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, cfg: dict,
         norm_in: tuple[torch.Tensor, float] | None = None,
         norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, glu: bool = False,
         x_scales: torch.Tensor | None = None, int8_out: tuple[torch.Tensor, torch.Tensor] | None = None,
         ) -> torch.Tensor:
    """Launch :func:`_gemv_gluon_kernel` (``cfg``: ``BLOCK_N``, ``WK``, ``XQ8``, ``PDL``, ``PDL_TILES``,
    ``PDL_L2``; arguments as :func:`holdall.kernels.triton_wq4.gemv`, which calls this for ``VARIANT "gluon"``):
    ``x_scales`` given means ``x`` is int8 words (int32 ``[K / 4]``) with these float32 scales ``[K / 8]`` (an
    ``XQ8`` config); ``int8_out = (words, scales)`` also writes ``norm_out``'s ``h`` as such words."""
    xq8 = bool(cfg.get("XQ8", False))
    reason = why_not(p, xq8)
    if reason is not None:
        raise ValueError(f"the Gluon GEMV cannot take this layer: {reason}")
    block_n, wk, pre = int(cfg["BLOCK_N"]), int(cfg.get("WK", 4)), int(cfg.get("PDL_TILES", 0))
    pdl, pdl_l2 = bool(cfg.get("PDL", False)), bool(cfg.get("PDL_L2", False))
    if block_n not in (2, 4, 8, 16) or wk not in (1, 2, 4, 8):
        raise ValueError(f"BLOCK_N (rows per thread) must be 2, 4, 8 or 16 and WK 1, 2, 4 or 8; got {block_n}, {wk}")
    if pre not in (0, 1, 2):
        raise ValueError(f"PDL_TILES (row tiles loaded before the wait) must be 0, 1 or 2; got {pre}")
    from .triton_wq4 import _check_int8_out, _check_int8_x, _norm_operands, writes_int8_words  # shared checks

    if x_scales is not None:  # int8 words from a Q8_OUT producer
        _check_int8_x(p, x, x_scales, xq8)
    elif x.dtype not in (torch.bfloat16, torch.float16) or x.numel() != p.in_features or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous bf16/fp16 row of {p.in_features}; got {x.dtype} {tuple(x.shape)}")
    q_out = qs_out = ops.scale
    if int8_out is not None:
        q_out, qs_out = int8_out
        if norm_out is None or not writes_int8_words(p, {"VARIANT": "gluon", "BLOCK_N": block_n}):
            raise ValueError("int8_out needs norm_out and BLOCK_N a multiple of 8 that divides the "
                             f"{p.out_features} rows (got BLOCK_N {block_n})")
        _check_int8_out(p, q_out, qs_out)
    n_half, tiles = programs_for(p, out, block_n, glu, norm_out)
    sq_in, eps, weight, h, sq_out = _norm_operands(ops, p, tiles, norm_in, norm_out)
    _gemv_gluon_kernel[(tiles,)](
        x.view(torch.int32), ops.words, ops.scale, bias if bias is not None else ops.scale, out,
        sq_in, sq_in.numel(), float(eps), weight, h, sq_out,
        x_scales if x_scales is not None else ops.scale, q_out, qs_out,
        p.out_features, n_half, ops.words.stride(0), p.scale_row_stride, p.group_step,
        K_WORDS=p.in_features // CODES_PER_WORD, GROUP_W=p.group // CODES_PER_WORD, R=block_n, WK=wk,
        X_BF16=x.dtype != torch.float16, HAS_BIAS=bias is not None, NORM_IN=norm_in is not None,
        SQ_BLOCK=max(32 * wk, 1 << max(0, (sq_in.numel() - 1).bit_length())) if norm_in is not None else 1,
        NORM_OUT=norm_out is not None, GLU=glu, XQ8=xq8, XIN8=x_scales is not None, Q8_OUT=int8_out is not None,
        PDL=pdl, PDL_TILES=pre, PDL_L2=pdl_l2, num_warps=wk, launch_pdl=pdl,
    )
    return out
