"""llama.cpp's asymmetric k-quants Q2_K, Q4_K and Q5_K: numpy encoders byte-identical to libggml, and decoders.

All three store super-blocks of 256 weights (QK_K) split into sub-blocks that each get a scale and a min, so a
weight decodes as ``y = d * sc * q - dmin * m``; ``d`` and ``dmin`` are fp16 per super-block, ``sc`` and ``m``
small integers per sub-block. Byte layouts (ggml-common.h), little-endian:

* Q2_K, 84 bytes: ``scales[16]`` (sub-block j: low nibble sc, high nibble m; 16 sub-blocks of 16) ·
  ``qs[64]`` (2-bit q; weight 128h + 32k + l sits in bits 2k..2k+1 of ``qs[32h + l]``) · ``d`` · ``dmin``.
* Q4_K, 144 bytes: ``d`` · ``dmin`` · ``scales[12]`` (eight 6-bit sc and eight 6-bit m, see
  :func:`_pack_scales_k4`; 8 sub-blocks of 32) · ``qs[128]`` (4-bit q; weight 64c + l in the low nibble of
  ``qs[32c + l]``, weight 64c + 32 + l in its high nibble).
* Q5_K, 176 bytes: ``d`` · ``dmin`` · ``scales[12]`` (as Q4_K) · ``qh[32]`` · ``qs[128]`` (low 4 bits as Q4_K;
  bit 4 of weight 64c + 32h + l is bit 2c + h of ``qh[l]``).

Encoding follows ggml-quants.c step by step, because llama.cpp's output is a search whose winner can flip on a
last-bit difference: every value is float32, every product and sum is done in C's operand order, and sums over a
sub-block are accumulated element by element (:func:`_seq_sum`) rather than with numpy's pairwise ``sum``.
Without an importance matrix the path is ``quantize_row_qN_K_ref`` (make_qkx2_quants per sub-block, sub-block
scales rounded against the largest one); with one it is ``quantize_row_qN_K_impl`` (weights ``qw * sqrt(sigma2 +
x^2)``, make_qkx3_quants per sub-block, make_qp_quants for the sub-block scales). Work is vectorised over all
sub-blocks at once; Python loops run only over the search candidates and over the positions of a sub-block.
Arrays are kept position-major, ``[n_positions, n_subblocks]``, so that one position of every sub-block is a
contiguous vector and C's left-to-right sums become row-by-row adds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import quants

QK_K = 256
_F32 = np.float32
# Super-blocks encoded per step: keeps the [positions, sub-blocks] working arrays (512 KiB each) in cache.
_CHUNK = 512
# nearest_int adds 1.5 * 2**23 so the integer lands in the low mantissa bits; valid for |x| <= 2**22 - 1.
_MAGIC = _F32(12582912.0)
_NEAREST_INT_LIMIT = _F32(4194303.0)
_GROUP_MAX_EPS = _F32(1e-15)


# ----------------------------------------------------------------------------------------------- float helpers

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """C's ``nearest_int`` bit for bit (int32, same shape): round half to even inside ±(2**22 - 1), and the same
    out-of-range results as the magic-number trick (NaN and ±inf come out as C gives them, not as np.rint)."""
    bits = (np.asarray(v, dtype=_F32) + _MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """``a [n, B] -> [B]``: a[0] + a[1] + ... + a[n-1] in that order, like C's ``for (i) s += a[i]``."""
    if a.shape[1] >= 2:
        # Reducing the outer axis of a C-contiguous array adds whole rows in order; numpy only sums pairwise
        # along a contiguous axis, which is what [n, 1] would become, hence the loop below for that case.
        return np.add.reduce(a, axis=0)
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _to_fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even, like numpy's cast) as float16."""
    with np.errstate(over="ignore"):  # beyond 65504 both give inf
        return np.asarray(v, dtype=_F32).astype(np.float16)


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    """float16 ``[S]`` -> its little-endian bytes ``[S, 2]``."""
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_from_bytes(raw: np.ndarray) -> np.ndarray:
    """``raw [S, 2]`` uint8 -> float32 ``[S]``."""
    return np.ascontiguousarray(raw).view("<f2").reshape(-1).astype(_F32)


def _level_error(scale, L, vmin, x, w, use_mad: bool) -> np.ndarray:
    """make_qkx*_quants' error Σ_i w·f(scale·L + min − x), f = |·| or (·)²: ``[n, B] -> [B]``."""
    diff = scale * L
    diff += vmin
    diff -= x
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= w
    return _seq_sum(diff)


# --------------------------------------------------------------------------------------- per-sub-block search

def _make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """make_qkx2_quants / make_qkx3_quants (with weights; they differ only in their parameters), for many
    sub-blocks at once.

    x, w: float32 ``[n, B]`` (position-major). Fits ``x ≈ scale·L + min`` with integer levels L in [0, nmax]
    and min <= 0, trying iscale = (nmax + rmin + rdelta·is) / (max − min) for is = 0..nstep and keeping the
    lowest weighted error. Returns ``scale [B]``, ``the_min [B]`` (= −min >= 0) and ``L [n, B]`` uint8 levels.
    """
    xlo = np.minimum.reduce(x, axis=0)
    xhi = np.maximum.reduce(x, axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    vmin = first_min = np.where(xlo > 0, _F32(0), xlo)  # C: if (min > 0) min = 0; the offset is never positive
    flat = xhi == vmin  # C returns scale 0, L = 0 for these before dividing by max − min
    with np.errstate(all="ignore"):  # flat sub-blocks divide by zero; they are overwritten at the end
        iscale = _F32(nmax) / (xhi - vmin)
        scale = _F32(1) / iscale
        # A candidate's levels are a function of (iscale, min) alone, so the search remembers the winning pair
        # and rebuilds its levels once at the end instead of copying [n, B] levels on every improvement.
        best_iscale, best_shift = iscale, vmin
        best = _level_error(scale, _levels_exact(x, vmin, iscale, nmax), vmin, x, w, use_mad)
        for step in range(nstep + 1):
            # C evaluates (rmin + rdelta*is + nmax) in float and divides by max − min with the *current* best
            # min, so a candidate depends on the ones before it: the loop cannot be batched over `step`.
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (xhi - vmin)
            lv = _candidate_levels(x, vmin, iscale, xlo, xhi, nmax)
            wl = w * lv
            sum_l = _seq_sum(wl)
            sum_xl = _seq_sum(wl * x)
            wl *= lv
            sum_l2 = _seq_sum(wl)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive_min = this_min > 0  # C then pins min at 0 and refits the scale alone
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive_min, _F32(0), this_min)
            err = _level_error(this_scale, lv, this_min, x, w, use_mad)
            better = (det > 0) & (err < best)
            best = np.where(better, err, best)
            best_iscale = np.where(better, iscale, best_iscale)
            best_shift = np.where(better, vmin, best_shift)
            scale = np.where(better, this_scale, scale)
            vmin = np.where(better, this_min, vmin)
        L = _levels_exact(x, best_shift, best_iscale, nmax)
    L[:, flat] = 0
    return np.where(flat, _F32(0), scale), -np.where(flat, first_min, vmin), L.astype(np.uint8)


def _levels_exact(x, shift, iscale, nmax: int) -> np.ndarray:
    """MAX(0, MIN(nmax, nearest_int(iscale·(x − shift)))) with C's rounding everywhere; ``[n, B]`` float32."""
    return np.clip(_nearest_int(iscale * (x - shift)), 0, nmax).astype(_F32)


def _candidate_levels(x, vmin, iscale, xlo, xhi, nmax: int) -> np.ndarray:
    """:func:`_levels_exact` for one search candidate, fast where it can be.

    np.rint equals nearest_int while |v| <= 2**22 − 1. When a sub-block's running min has moved onto its max
    (e.g. data <= 0 whose fit pinned the min at 0), iscale is inf; when round-off leaves the min just below the
    max, iscale is finite but huge and C's magic-number rounding returns values that the clamp can turn into any
    level (the libggml this matches does not clamp v before rounding, in make_qkx3_quants either). Those
    sub-blocks are redone with the bit-exact rounding.
    """
    with np.errstate(all="ignore"):
        # iscale >= 0, so v is monotone in x: its extremes are those of the sub-block's data.
        in_range = (iscale * (xlo - vmin) >= -_NEAREST_INT_LIMIT) & (iscale * (xhi - vmin) <= _NEAREST_INT_LIMIT)
        v = x - vmin
        v *= iscale
        np.rint(v, out=v)
        np.clip(v, _F32(0), _F32(nmax), out=v)
    if not in_range.all():  # False on NaN too
        # iscale = inf (min == max, e.g. all-zero sub-blocks): v is ±inf or NaN, which nearest_int and the
        # clamp turn into level 0 throughout; only finite iscale can give finite out-of-range garbage.
        infinite = np.isinf(iscale)
        v[:, np.flatnonzero(infinite)] = 0
        odd = np.flatnonzero(~in_range & ~infinite)
        if odd.size:
            v[:, odd] = _levels_exact(x[:, odd], vmin[odd], iscale[odd], nmax)
    return v


def _make_qp_quants(x: np.ndarray, qw: np.ndarray, nmax: int):
    """make_qp_quants for many super-blocks: non-negative values ``x [n, S]`` (the sub-block scales or mins)
    quantized to levels 0..nmax of one scale, weighted by ``qw [n, S]``.

    Returns ``scale [S]`` and the levels ``[n, S]`` (int) as C's uint8 ``L`` holds them (wrapped mod 256).
    """
    vmax = np.maximum.reduce(x, axis=0)
    vmax = np.where(vmax > 0, vmax, _F32(0))  # C: max starts at 0
    empty = vmax < _GROUP_MAX_EPS
    with np.errstate(all="ignore"):  # empty super-blocks divide by zero; overwritten at the end
        iscale = _F32(nmax) / vmax
        first_levels = (_nearest_int(iscale * x) & 0xFF).astype(_F32)
        scale = _F32(1) / iscale
        diff = x - scale * first_levels
        best = _seq_sum(qw * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (_F32(0.1) * _F32(step) + _F32(nmax)) / vmax
            scale_is = _F32(1) / iscale_is
            lv = np.minimum(_nearest_int(iscale_is * x), nmax).astype(_F32)
            diff = x - scale_is * lv
            mse = _seq_sum(qw * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        lv = np.minimum(_nearest_int(iscale * x), nmax)
        # The sums use the int level, L stores it as uint8: they differ only for a negative input value.
        L = lv & 0xFF
        lf = lv.astype(_F32)
        sumlx = _seq_sum(qw * x * lf)
        suml2 = _seq_sum(qw * lf * lf)
        L, sumlx, suml2 = _refine_qp_levels(x, qw, L, sumlx, suml2, nmax)
        result = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    L[:, empty] = 0
    return np.where(empty, _F32(0), result), L


def _refine_qp_levels(x, qw, L, sumlx, suml2, nmax: int):
    """make_qp_quants' coordinate descent: up to 5 passes, each moving one level at a time to the value that
    least-squares would give it, when that raises sumlx²/suml2. C stops after a pass without changes; a
    further pass would change nothing either (same state, same decisions), so all passes run for all blocks."""
    for _ in range(5):
        for i in range(x.shape[0]):
            w, xi = qw[i], x[i]
            li = L[i].astype(_F32)
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            movable = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(_nearest_int(xi * sl2 / slx), nmax)
            movable &= new_l != L[i]
            nf = new_l.astype(_F32)
            slx = slx + w * xi * nf
            sl2 = sl2 + w * nf * nf
            take = movable & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new_l & 0xFF, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    return L, sumlx, suml2


# ------------------------------------------------------------------------------------------ shared block steps

def _subblocks(xb: np.ndarray, size: int) -> np.ndarray:
    """Super-blocks ``[S, 256]`` -> position-major sub-blocks ``[size, S * 256 // size]`` (sub-block s*k + j)."""
    return np.ascontiguousarray(xb.reshape(-1, size).T)


def _ref_weights_av_abs(xs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``_ref`` weights av_x + |x|, av_x = sqrt(Σx²/32) of the sub-block; ``[32, B] -> [32, B]``."""
    av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
    return av_x + np.abs(xs)


def _imatrix_weights(xb: np.ndarray, qw: np.ndarray, size: int, sigma_factor: float) -> np.ndarray:
    """``_impl`` weights qw · sqrt(sigma2 + x²) with sigma2 = factor·Σx²/256 over the super-block.

    xb, qw: ``[S, 256]``; returns position-major ``[size, S * 256 // size]``.
    """
    sum_x2 = _seq_sum(np.ascontiguousarray((xb * xb).T))  # [S]
    sigma2 = _F32(sigma_factor) * sum_x2 / _F32(QK_K)  # factor 1 (Q2_K) multiplies exactly
    w = qw * np.sqrt(sigma2[:, None] + xb * xb)
    return _subblocks(w, size)


def _requantize(xs: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int) -> np.ndarray:
    """Levels recomputed against the stored (fp16-rounded, integer-scaled) d and dmin·m.

    xs, L: ``[n, B]``; d, dm: ``[B]`` float32. C skips sub-blocks whose d is 0, leaving the search's levels.
    Returns uint8 ``[n, B]``.
    """
    with np.errstate(all="ignore"):
        lv = np.clip(_nearest_int((xs + dm) / d), 0, nmax)
    return np.where(d != 0, lv, L).astype(np.uint8)


def _positions_by_block(L: np.ndarray, n_blocks: int) -> np.ndarray:
    """Position-major levels ``[size, B]`` -> weight order ``[S, 256]``."""
    return np.ascontiguousarray(L.T).reshape(n_blocks, QK_K)


def _max_or_zero(v: np.ndarray) -> np.ndarray:
    """Row max of ``v [S, k]``, or +0 when none is positive (C's ``if (v > m) m = v`` from m = 0)."""
    m = np.maximum.reduce(v, axis=1)
    return np.where(m > 0, m, _F32(0))


# ------------------------------------------------------------------------------------- 6-bit scales (Q4_K, Q5_K)

def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[S, 8]`` -> the 12 ``scales`` bytes ``[S, 12]``.

    Bytes 0-3: sc0-3 (bits 0-5) + bits 4-5 of sc4-7 (bits 6-7); bytes 4-7: m0-3 + bits 4-5 of m4-7; bytes 8-11:
    low nibble sc4-7, high nibble m4-7. Integer inputs are stored with C's uint8 truncation.
    """
    ls = ls.astype(np.int64) & 0xFF
    lm = lm.astype(np.int64) & 0xFF
    out = np.empty((ls.shape[0], 12), dtype=np.int64)
    out[:, 0:4] = ls[:, :4] | (((ls[:, 4:] >> 4) << 6) & 0xFF)
    out[:, 4:8] = lm[:, :4] | (((lm[:, 4:] >> 4) << 6) & 0xFF)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out.astype(np.uint8)


def _unpack_scales_k4(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for all eight sub-blocks: ``[S, 12]`` uint8 -> (sc, m) ``[S, 8]`` uint8."""
    lo, mid, hi = sc12[:, 0:4], sc12[:, 4:8], sc12[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def _k4_scales_ref(scales: np.ndarray, mins: np.ndarray):
    """``_ref`` sub-block scales: round scale·63/max_scale (and the mins likewise) to 6 bits.

    scales, mins: ``[S, 8]``. Returns (ls, lm) ``[S, 8]`` int and (d, dmin) float16 ``[S]``.
    """
    max_scale = _max_or_zero(scales)
    max_min = _max_or_zero(mins)
    with np.errstate(all="ignore"):  # a zero or subnormal maximum; masked below
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    # C stores nearest_int in a uint8 before MIN(63, ·): a (never expected) negative wraps, then clamps.
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    return ls, lm, _to_fp16(max_scale / _F32(63)), _to_fp16(max_min / _F32(63))


def _k4_scales_impl(scales, mins, sw, clamp63: bool):
    """``_impl`` sub-block scales: make_qp_quants(8, 63) over the scales and over the mins, weighted by Σw.

    scales, mins, sw: ``[S, 8]``. Q5_K clamps the levels to 63 after C's uint8 store, Q4_K does not.
    """
    sw_t = np.ascontiguousarray(sw.T)
    d_block, ls = _make_qp_quants(np.ascontiguousarray(scales.T), sw_t, 63)
    m_block, lm = _make_qp_quants(np.ascontiguousarray(mins.T), sw_t, 63)
    ls, lm = ls.T, lm.T
    if clamp63:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return ls, lm, _to_fp16(d_block), _to_fp16(m_block)


def _k4_blocks(xb: np.ndarray, qw: np.ndarray | None, nmax: int, ref_search: tuple, clamp63: bool):
    """Shared Q4_K/Q5_K encoder core: ``xb [S, 256]`` -> (d, dmin float16 [S], scales12 [S, 12], L [S, 256])."""
    n_blocks = xb.shape[0]
    xs = _subblocks(xb, 32)  # [32, S*8]
    if qw is None:
        w = _ref_weights_av_abs(xs)
        scales, mins, L = _make_qkx_quants(xs, w, nmax, *ref_search, use_mad=False)
        ls, lm, d, dmin = _k4_scales_ref(scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8))
    else:
        w = _imatrix_weights(xb, qw, 32, 2.0)
        sw = _seq_sum(w)
        scales, mins, L = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, use_mad=False)
        ls, lm, d, dmin = _k4_scales_impl(scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8),
                                          sw.reshape(n_blocks, 8), clamp63)
    sc12 = _pack_scales_k4(ls, lm)
    sc, m = _unpack_scales_k4(sc12)  # requantize against what the decoder will read
    d_sub = (d.astype(_F32)[:, None] * sc.astype(_F32)).reshape(-1)
    dm_sub = (dmin.astype(_F32)[:, None] * m.astype(_F32)).reshape(-1)
    q = _requantize(xs, L, d_sub, dm_sub, nmax)
    return d, dmin, sc12, _positions_by_block(q, n_blocks)


# ---------------------------------------------------------------------------------------------------- Q4_K

def _q4_k_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``[S, 256]`` float32 -> Q4_K blocks ``[S, 144]``."""
    return pack_q4_k(*_k4_blocks(xb, qw, 15, (-1.0, 0.1, 20), clamp63=False))


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, sc12: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K blocks ``[S, 144]`` from d, dmin (float16 ``[S]``), the 12 scale bytes ``[S, 12]`` and the levels
    ``q [S, 256]`` (0..15, weight order). Shared with formats.gguf.refine, which chooses its own levels."""
    q = q.reshape(-1, 4, 2, 32)  # [S, 64-chunk c, half h, l]: weight 64c + 32h + l
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), sc12, qs.reshape(-1, 128)], axis=1)


def _decode_q4_k(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    blocks = raw.reshape(-1, 144)
    d, dmin = _fp16_from_bytes(blocks[:, 0:2]), _fp16_from_bytes(blocks[:, 2:4])
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF  # [S, 4, 2, 32]
    return _decode_k4(blocks[:, 4:16], d, dmin, q, n_per_row)


def _decode_k4(sc12, d, dmin, q, n_per_row):
    """y = (d·sc)·q − dmin·m per sub-block; q ``[S, 4, 2, 32]`` levels in weight order."""
    sc, m = _unpack_scales_k4(sc12)
    d_sub = (d[:, None] * sc.astype(_F32))[:, :, None]
    dm_sub = (dmin[:, None] * m.astype(_F32))[:, :, None]
    y = d_sub * q.reshape(-1, 8, 32).astype(_F32) - dm_sub
    return y.reshape(-1, n_per_row)


# ---------------------------------------------------------------------------------------------------- Q5_K

def _q5_k_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``[S, 256]`` float32 -> Q5_K blocks ``[S, 176]``."""
    return pack_q5_k(*_k4_blocks(xb, qw, 31, (-0.5, 0.1, 15), clamp63=True))


def pack_q5_k(d: np.ndarray, dmin: np.ndarray, sc12: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q5_K blocks ``[S, 176]`` from d, dmin (float16 ``[S]``), the scale bytes ``[S, 12]`` and levels
    ``q [S, 256]`` (0..31, weight order)."""
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
    high_bit = (q >> 4).astype(np.uint8)  # [S, c, h, l] -> bit 2c + h of qh[l]
    qh = np.bitwise_or.reduce((high_bit << _QH_SHIFTS).reshape(-1, 8, 32), axis=1)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), sc12, qh, qs.reshape(-1, 128)], axis=1)


_QH_SHIFTS = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)


def _decode_q5_k(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    blocks = raw.reshape(-1, 176)
    d, dmin = _fp16_from_bytes(blocks[:, 0:2]), _fp16_from_bytes(blocks[:, 2:4])
    qh = blocks[:, 16:48].reshape(-1, 1, 1, 32)
    qs = blocks[:, 48:176].reshape(-1, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
    q = q | (((qh >> _QH_SHIFTS) & 1) << 4)
    return _decode_k4(blocks[:, 4:16], d, dmin, q, n_per_row)


# ---------------------------------------------------------------------------------------------------- Q2_K

def _q2_k_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``[S, 256]`` float32 -> Q2_K blocks ``[S, 84]``."""
    n_blocks = xb.shape[0]
    xs = _subblocks(xb, 16)  # [16, S*16]
    if qw is None:
        scales, mins, L = _make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        sc16, d, dmin = _q2_k_scales_ref(scales.reshape(n_blocks, 16), mins.reshape(n_blocks, 16))
    else:
        w = _imatrix_weights(xb, qw, 16, 1.0)
        sw = _seq_sum(w).reshape(n_blocks, 16)
        scales, mins, L = _make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, use_mad=False)
        sw_t = np.ascontiguousarray(sw.T)
        d_block, ls = _make_qp_quants(np.ascontiguousarray(scales.reshape(n_blocks, 16).T), sw_t, 15)
        m_block, lm = _make_qp_quants(np.ascontiguousarray(mins.reshape(n_blocks, 16).T), sw_t, 15)
        sc16 = ((ls.T | (lm.T << 4)) & 0xFF).astype(np.uint8)
        d, dmin = _to_fp16(d_block), _to_fp16(m_block)
    d_sub = (d.astype(_F32)[:, None] * (sc16 & 0xF).astype(_F32)).reshape(-1)
    dm_sub = (dmin.astype(_F32)[:, None] * (sc16 >> 4).astype(_F32)).reshape(-1)
    q = _positions_by_block(_requantize(xs, L, d_sub, dm_sub, 3), n_blocks)
    return pack_q2_k(d, dmin, sc16, q)


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, sc16: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q2_K blocks ``[S, 84]`` from d, dmin (float16 ``[S]``), the scale bytes ``[S, 16]`` (sub-block j: sc in
    the low nibble, m in the high one) and the levels ``q [S, 256]`` (0..3, weight order). Shared with
    formats.gguf.refine, which chooses its own levels and scales."""
    q = q.reshape(-1, 2, 4, 32)  # [S, half h, k, l]: weight 128h + 32k + l -> bits 2k of qs[32h + l]
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.concatenate([sc16, qs.reshape(-1, 64), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


def _q2_k_scales_ref(scales: np.ndarray, mins: np.ndarray):
    """``_ref`` 4-bit sub-block scales and mins ``[S, 16]`` -> (scales bytes [S, 16] uint8, d, dmin float16)."""
    max_scale = _max_or_zero(scales)
    max_min = _max_or_zero(mins)
    with np.errstate(all="ignore"):  # a zero or subnormal maximum; masked below
        ls = _nearest_int((_F32(15) / max_scale)[:, None] * scales)
        lm = _nearest_int((_F32(15) / max_min)[:, None] * mins)
    # C writes the scale into the byte, then ORs in min << 4 (both with uint8 truncation); a zero maximum
    # leaves the nibble 0 and the fp16 0.
    ls = np.where(max_scale[:, None] > 0, ls & 0xFF, 0)
    lm = np.where(max_min[:, None] > 0, (lm << 4) & 0xFF, 0)
    sc16 = (ls | lm).astype(np.uint8)
    return sc16, _to_fp16(max_scale / _F32(15)), _to_fp16(max_min / _F32(15))


def _decode_q2_k(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    blocks = raw.reshape(-1, 84)
    sc16, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = _fp16_from_bytes(blocks[:, 80:82]), _fp16_from_bytes(blocks[:, 82:84])
    dl = (d[:, None] * (sc16 & 0xF).astype(_F32))[:, :, None]
    ml = (dmin[:, None] * (sc16 >> 4).astype(_F32))[:, :, None]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3  # [S, h, k, l] = weight 128h + 32k + l
    y = dl * q.reshape(-1, 16, 16).astype(_F32) - ml
    return y.reshape(-1, n_per_row)


# ------------------------------------------------------------------------------------------------ entry points

def _encoder(block_fn: Callable[[np.ndarray, "np.ndarray | None"], np.ndarray], type_size: int):
    def encode(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """rows float32 ``[n_rows, n_per_row]`` -> uint8 ``[n_rows, n_per_row // 256 * type_size]``."""
        rows = np.ascontiguousarray(rows, dtype=_F32)
        n_rows, n_per_row = rows.shape
        per_row = n_per_row // QK_K
        blocks = rows.reshape(-1, QK_K)
        # quant_weights[256*i + l] weighs position l of the row's super-block i.
        imat = None if imatrix is None else np.asarray(imatrix, dtype=_F32).reshape(per_row, QK_K)
        out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
        for start in range(0, blocks.shape[0], _CHUNK):
            stop = min(start + _CHUNK, blocks.shape[0])
            qw = None if imat is None else imat[np.arange(start, stop) % per_row]
            out[start:stop] = block_fn(blocks[start:stop], qw)
        return out.reshape(n_rows, per_row * type_size)

    return encode


# The 6-bit sub-block scale packing, public for formats.gguf.refine (which re-fits scales and mins).
pack_scales_k4 = _pack_scales_k4
unpack_scales_k4 = _unpack_scales_k4

quants.register("Q2_K", _encoder(_q2_k_blocks, 84), _decode_q2_k)
quants.register("Q4_K", _encoder(_q4_k_blocks, 144), _decode_q4_k)
quants.register("Q5_K", _encoder(_q5_k_blocks, 176), _decode_q5_k)
