"""F32/F16/BF16, the 32-element legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the k-quants Q6_K and Q3_K.

Every encoder reproduces libggml's bytes exactly: ``ggml_quantize_chunk(type, rows, ..., imatrix)``, i.e. the
``quantize_row_*_ref`` quantizers without an importance matrix and llama.cpp's ``quantize_row_*_impl`` with one
(Q8_0 and the float types ignore it). Bit-exactness comes from mirroring the C arithmetic, not from tolerance:
float32 everywhere, the same operation order, sequential (not pairwise) sums, ``nearest_int``'s magic-number
rounding, C's truncating float->int casts, ``roundf``'s half-away-from-zero, fp16 round-to-nearest-even.

Block layouts (ggml-common.h, little endian; ``half`` is IEEE fp16):

    Q8_0  34 B / 32   half d; int8 qs[32]                        x = d * q
    Q4_0  18 B / 32   half d; u8 qs[16]                          x = d * (q - 8)
    Q4_1  20 B / 32   half d, m; u8 qs[16]                       x = d * q + m
    Q5_0  22 B / 32   half d; u32 qh; u8 qs[16]                  x = d * (q - 16)
    Q5_1  24 B / 32   half d, m; u32 qh; u8 qs[16]               x = d * q + m
      element j's low 4 bits are the low nibble of qs[j], element j+16's the high nibble; Q5's bit 4 of
      element j is bit j of qh.
    Q6_K  210 B / 256 u8 ql[128]; u8 qh[64]; int8 scales[16]; half d      x = d * scales[j // 16] * (q - 32)
      per 128-value half h and lane l < 32, with q indexed inside the half: ql[64h+l] = q[l] | q[l+64] << 4,
      ql[64h+32+l] = q[l+32] | q[l+96] << 4, qh[32h+l] = the top 2 bits of q[l], q[l+32], q[l+64], q[l+96] at
      shifts 0, 2, 4, 6.
    Q3_K  110 B / 256 u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d      x = d * (sc[j // 16] - 32) * (q - 4)
      bit 2 of q[j] is bit j // 32 of hmask[j % 32]; the low 2 bits go to qs four to a byte (shifts 0/2/4/6 for
      offsets 0/32/64/96 of each 128-value half); the sixteen 6-bit scales: low nibbles of s and s+8 in
      scales[s] (s < 8), the top 2 bits of scale 4g+m in scales[8+m] at shift 2g.
    F32 / F16 / BF16  one value per element (BF16: the top half of the fp32 bits, rounded to nearest even).

Two array layouts keep numpy's loops long and contiguous:
  * "position-major" ``[n, B]``: one column per (sub-)block, so a per-block sum is n sequential vector adds
    (exactly C's loop order) and everything else is elementwise. Used by the searches (k-quants, imatrix paths).
  * "lanes" ``[n/4, 4B]``: row k holds values 4k..4k+3 of every block. It costs one transpose of 16-byte units,
    several times cheaper than a float transpose; the simple legacy quantizers need nothing more.
Rows are processed in chunks of a few hundred thousand values so the temporaries stay in cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import quants

QK = 32  # legacy block length (QK4_0 .. QK8_0)
QK_K = 256  # k-quant super-block length
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group whose max |x| is below this is "all zero"

_F32 = np.float32

_BLOCKS = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    "Q5_0": np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    "Q5_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    "Q6_K": np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]),
    "Q3_K": np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")]),
}


# ------------------------------------------------------------------------------------------------------------
# C arithmetic, elementwise


def fp16_round(x: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)): numpy's float16 cast rounds to nearest even like ggml's."""
    return np.asarray(x, dtype=_F32).astype(np.float16).astype(_F32)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit (int32): adding 1.5 * 2**23 rounds to an integer, half to even.

    Equal to np.rint for |v| < 2**22; unlike np.rint it also reproduces C's result for huge, infinite and NaN
    inputs, which degenerate groups can produce (e.g. an fp16 scale that overflowed to inf)."""
    bits = (np.asarray(v, dtype=_F32) + _F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _clamped_nearest(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32 (nearest_int's steps, in place on one buffer)."""
    t = np.asarray(v, dtype=_F32) + _F32(12582912.0)
    bits = t.view(np.int32)
    bits &= 0x007FFFFF
    np.subtract(bits, 0x00400000, out=t, casting="unsafe")  # the int32 result, converted exactly
    return np.clip(t, lo, hi, out=t)


def c_roundf_int32(v: np.ndarray) -> np.ndarray:
    """``(int)roundf(v)`` as C does it on x86 (roundf takes halves away from zero; np.rint takes them to even).

    roundf(v) == trunc(v + copysign(0.49999997, v)): adding the float just below 0.5 keeps 0.49999997 from
    rounding up, and the sum never crosses the next integer (checked against the definition for every float32
    of magnitude below 2**24; larger ones are integers). The int conversion is the trunc."""
    below_half = (v.view(np.uint32) & np.uint32(0x80000000)) | np.uint32(0x3EFFFFFF)  # copysign, in bits
    return c_int32(v + below_half.view(_F32))


def c_int32(v: np.ndarray) -> np.ndarray:
    """C's float -> integer conversion on x86 (cvttss2si): truncation; NaN and out-of-range give INT_MIN.
    Narrowing the int32 afterwards (astype int8/uint8) keeps the low byte, as C's ``(int8_t)`` casts do."""
    return v.astype(np.int32)


def seq_sum(a: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum ``a`` over axis 0 in C's loop order ((a[0] + a[1]) + a[2]) + ...: [n, ...] -> [...].

    np.sum may add pairwise, which changes last bits. ``from_zero`` mirrors ``float s = 0; s += ...``
    (a leading -0.0 becomes +0.0); without it the sum starts at a[0], as ``sum_w = weights[0]`` does."""
    s = a[0] + _F32(0) if from_zero else a[0].copy()
    for k in range(1, a.shape[0]):
        np.add(s, a[k], out=s)
    return s


def signed_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """C's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from amax = max = 0, along ``axis``: the first
    value of largest magnitude, with its sign; +0.0 for an all-zero group. NaN never wins a comparison, so it
    is skipped (scales can be NaN after overflow)."""
    rows = x if axis == 1 else x.T
    return _signed_extreme(np.fmax.reduce(x, axis=axis), np.fmin.reduce(x, axis=axis), rows)


def _signed_extreme(hi: np.ndarray, lo: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """signed_absmax from each group's (NaN-skipping) max and min [B]; rows: the groups [B, n] (any view), read
    only for groups that hold both +a and -a, where the first one wins."""
    out = np.where(hi >= -lo, hi, lo) + _F32(0)  # + 0 turns -0.0 into +0.0
    out[np.isnan(out)] = 0  # all NaN: nothing beat amax = 0
    tie = np.nonzero((hi == -lo) & (hi != 0))[0]
    if tie.size:
        g = rows[tie]
        out[tie] = g[np.arange(tie.size), np.argmax(np.abs(g) == hi[tie, None], axis=1)]
    return out


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """C's ``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, _F32(1) / d, _F32(0))


# ------------------------------------------------------------------------------------------------------------
# layouts


def _positions_first(x: np.ndarray, n: int) -> np.ndarray:
    """Groups of n consecutive values as columns: [..., n*B] -> contiguous [n, B]."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _lanes(x: np.ndarray, n: int = QK) -> np.ndarray:
    """Groups of n consecutive values -> [n/4, 4B]: row k holds values 4k..4k+3 of every group."""
    return np.ascontiguousarray(x.reshape(-1, n).view("V16").T).view(_F32).reshape(n // 4, -1)


def _per_lane(v: np.ndarray) -> np.ndarray:
    """A per-group value [B] repeated for the four lanes of a lanes row: [4B]."""
    return np.repeat(v, 4)


def _lanes_max(xl: np.ndarray) -> np.ndarray:
    m = xl.max(axis=0).reshape(-1, 4)
    return np.maximum(np.maximum(m[:, 0], m[:, 1]), np.maximum(m[:, 2], m[:, 3]))


def _lanes_min(xl: np.ndarray) -> np.ndarray:
    m = xl.min(axis=0).reshape(-1, 4)
    return np.minimum(np.minimum(m[:, 0], m[:, 1]), np.minimum(m[:, 2], m[:, 3]))


def _unlane_bytes(q: np.ndarray) -> np.ndarray:
    """Inverse of the lanes layout for bytes: uint8/int8 [m, 4B] -> [B, 4m] in element order."""
    return np.ascontiguousarray(q.view("<u4").T).view(q.dtype)


# ------------------------------------------------------------------------------------------------------------
# ggml-quants.c's level searches, vectorised over groups (x, w: [n, B], one column per group)


# make_qx_quants' candidates, in C's order: iscale = -nmax/max, then -(nmax + 0.1*is)/max for is = -9..9, is != 0
_QX_STEPS = [None] + [step for step in range(-9, 10) if step != 0]
_QX_BATCH_VALUES = 1 << 18  # candidates are evaluated a few at a time: [n, G, B] with n*G*B about this


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weighted levels in [-nmax, nmax-1]: make_qx_quants with rmse_type 1 and weights ``w``
    (C's rmse_type 1 without quant weights is w = x*x).

    Every candidate iscale gives levels and the sums sumlx, suml2; the candidates are independent, so they are
    computed in batches, and only the choice of the best (largest sumlx^2/suml2, first wins) runs in order.
    Returns (scale [B], L [n, B] uint8 = level + nmax; all 0 for groups below GROUP_MAX_EPS)."""
    vmax = signed_absmax(x, axis=0)
    live = np.abs(vmax) >= GROUP_MAX_EPS
    vmax = np.where(live, vmax, _F32(1))
    iscales = np.stack([(_F32(-nmax) if step is None else -(_F32(nmax) + _F32(0.1) * _F32(step))) / vmax
                        for step in _QX_STEPS])  # [19, B]
    # For finite x, |iscale * x| <= nmax + 1 and np.rint equals nearest_int. Sub-scales (the x of Q3_K's second
    # search) can be inf/NaN after an overflow; nearest_int maps those to garbage that C then clamps.
    exact = not np.isfinite(x).all()
    sumlx, suml2 = _qx_sums(x, w, iscales, nmax, exact)

    scale = np.where(suml2[0] != 0, sumlx[0] / suml2[0], _F32(0))
    best = scale * sumlx[0]
    best_iscale = iscales[0]
    for c in range(1, len(_QX_STEPS)):
        better = (suml2[c] > 0) & (sumlx[c] * sumlx[c] > best * suml2[c])
        scale = np.where(better, sumlx[c] / suml2[c], scale)
        best = np.where(better, scale * sumlx[c], best)
        best_iscale = np.where(better, iscales[c], best_iscale)
    L = (_qx_levels(x, best_iscale[None], nmax, exact)[:, 0] + nmax).astype(np.uint8)
    L[:, ~live] = 0
    return np.where(live, scale, _F32(0)), L


def _qx_levels(x: np.ndarray, iscales: np.ndarray, nmax: int, exact: bool) -> np.ndarray:
    """MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x))) for candidates iscales [G, B]: float32 [n, G, B]."""
    l = x[:, None, :] * iscales
    if exact:
        return _clamped_nearest(l, -nmax, nmax - 1)
    np.rint(l, out=l)
    return np.clip(l, -nmax, nmax - 1, out=l)


def _qx_sums(x: np.ndarray, w: np.ndarray, iscales: np.ndarray, nmax: int, exact: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """C's ``sumlx += w*x[i]*l; suml2 += w*l*l`` for each candidate iscale [C, B]: two [C, B] arrays."""
    wx = (w * x)[:, None, :]  # C: w*x[i]*l == (w*x[i])*l
    w = w[:, None, :]
    sumlx = np.empty_like(iscales)
    suml2 = np.empty_like(iscales)
    batch = max(1, _QX_BATCH_VALUES // x.size)
    for c0 in range(0, len(iscales), batch):
        l = _qx_levels(x, iscales[c0:c0 + batch], nmax, exact)  # [n, G, B]: each position a contiguous block
        p = wx * l
        sumlx[c0:c0 + batch] = seq_sum(p)
        np.multiply(w, l, out=p)
        p *= l
        suml2[c0:c0 + batch] = seq_sum(p)
    return sumlx, suml2


class Workspace:
    """Reusable float/bool buffers for one encode call. A fresh multi-megabyte temporary costs page faults
    (glibc returns the freed heap top to the OS between chunks), several times the arithmetic done on it; the
    hot loops write into these instead. ``get(name, shape, dtype)`` returns a C-contiguous view."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name: str, shape: tuple, dtype=_F32) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self._bufs[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


_NEAREST_INT_RANGE = _F32(4194304.0)  # np.rint == nearest_int for |v| < 2**22
_Q3_BLOCK = 1 << 14  # columns per full-width pass of make_q3_quants: 1 MiB per [16, block] float32 buffer


def make_q3_quants(x: np.ndarray, nmax: int, work: Workspace | None = None, by_rows: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): weights x^2, levels in [-nmax, nmax-1] from iscale = -nmax/max, then up
    to 5 coordinate-descent sweeps over the positions, moving one level at a time while sumlx^2/suml2 grows.
    x: finite float32 [n, B] position-major, or [B, n] (one group per row) with ``by_rows``; ``work``: buffers
    to reuse across calls. Returns (scale [B], L [n, B] uint8 = level + nmax).

    C's sweeps are a state machine per column: a position's decision depends only on the current (L, sums), which
    change only at an accepted move. So after a move at position p, the next move is the first accepted position
    in the cyclic order p+1 .. n-1 (this sweep), 0 .. p (the next one, if sweeps are left); if none of those n
    positions moves, the next sweep would repeat the same rejections and C stops. Each round therefore evaluates
    every position of every searching column with the current sums and takes each column's first move in that
    order (:func:`_q3_next_moves`); a column leaves the search at its first round without a move. Most columns
    never move: round one runs at full width, in cache-sized blocks of columns (``work``'s buffers), and the
    columns that moved are pooled over all blocks for the later rounds, so that those cost arithmetic rather
    than numpy's per-call overhead."""
    B, n = x.shape if by_rows else x.shape[::-1]
    work = work if work is not None else Workspace()
    levels = np.empty((n, B), np.uint8)
    sumlx = np.empty(B, _F32)
    suml2 = np.empty(B, _F32)
    live = np.empty(B, bool)
    pool = []
    with np.errstate(all="ignore"):
        for c0 in range(0, B, _Q3_BLOCK):
            c1 = min(B, c0 + _Q3_BLOCK)
            shape = (n, c1 - c0)
            xb = work.get("q3_x", shape)
            np.copyto(xb, x[c0:c1].T if by_rows else x[:, c0:c1])
            # signed_absmax(xb, axis=0); x is finite here (quantize checks), so plain max/min replace fmax/fmin
            vmax = _signed_extreme(np.maximum.reduce(xb, axis=0), np.minimum.reduce(xb, axis=0), xb.T)
            lv = live[c0:c1]
            np.greater_equal(np.abs(vmax), GROUP_MAX_EPS, out=lv)
            iscale = _F32(-nmax) / np.where(lv, vmax, _F32(1))
            # |iscale*x| <= nmax (times 1 + 2 ulp): np.rint is nearest_int there, and only the top needs a clamp
            L = np.multiply(iscale, xb, out=work.get("q3_L", shape))
            np.rint(L, out=L)
            np.minimum(L, _F32(nmax - 1), out=L)
            w = np.multiply(xb, xb, out=work.get("q3_w", shape))
            wxl = np.multiply(w, xb, out=work.get("q3_wxl", shape))  # C's w*x[i]*L[i] and w*L[i]*L[i]
            wxl *= L
            wl2 = np.multiply(w, L, out=w)
            wl2 *= L
            sx, s2 = sumlx[c0:c1], suml2[c0:c1]
            sx[...] = seq_sum(wxl)
            s2[...] = seq_sum(wl2)
            sx[~lv] = -np.inf  # all-zero groups never move (slx = -inf); their scale is 0 below
            cur = np.zeros(shape[1], np.int8)  # the sweep (C's itry) of positions >= st; those < st: sweep cur+1
            st = np.zeros(shape[1], np.int8)
            moves = _q3_next_moves(xb, L, wxl, wl2, sx, s2, cur, st, nmax, _q3_scratch(work, shape))
            g = _q3_apply(moves, L, wxl, wl2, sx, s2, cur, st)  # columns that go on searching
            if g.size:
                pool.append([g + c0] + [a.take(g, axis=1) for a in (xb, L, wxl, wl2)] + [cur[g], st[g]])
            lb = levels[:, c0:c1].view(np.int8)
            np.copyto(lb, L, casting="unsafe")
            lb += np.int8(nmax)
        if pool:
            gi, xc, Lc, wxlc, wl2c, cc, sc = (np.concatenate(parts, axis=-1) for parts in zip(*pool))
            sx, s2 = sumlx[gi], suml2[gi]
            finished = []
            while True:
                moves = _q3_next_moves(xc, Lc, wxlc, wl2c, sx, s2, cc, sc, nmax, _q3_scratch(work, xc.shape))
                more = _q3_apply(moves, Lc, wxlc, wl2c, sx, s2, cc, sc)
                if more.size < gi.size:
                    done = np.ones(gi.size, bool)
                    done[more] = False
                    finished.append((gi[done], Lc[:, done], sx[done], s2[done]))
                if not more.size:
                    break
                gi, sx, s2, cc, sc = gi[more], sx[more], s2[more], cc[more], sc[more]
                xc, Lc, wxlc, wl2c = (a.take(more, axis=1) for a in (xc, Lc, wxlc, wl2c))
            gi, Lc, sx, s2 = (np.concatenate(parts, axis=-1) for parts in zip(*finished))
            levels[:, gi] = Lc + _F32(nmax)
            sumlx[gi], suml2[gi] = sx, s2
        scale = np.where(live & (suml2 > 0), sumlx / suml2, _F32(0))
    dead = np.flatnonzero(~live)
    if dead.size:
        levels[:, dead] = 0
    return scale, levels


def _q3_scratch(work: Workspace, shape: tuple) -> tuple:
    return (work.get("q3_s1", shape), work.get("q3_s2", shape), work.get("q3_m1", shape, bool),
            work.get("q3_m2", shape, bool))


def _q3_next_moves(x, L, wxl, wl2, sumlx, suml2, cur, st, nmax, scratch=None):
    """Each column's next move of make_q3_quants (see there): at every position, C's ``slx = sumlx - w*x*L[i];
    if (slx > 0) { sl2 = suml2 - w*L[i]*L[i]; new_l = nearest_int(x*sl2/slx); if (new_l != L[i]) { slx += ...;
    sl2 += ...; accept if (sl2 > 0 && slx*slx*suml2 > sumlx*sumlx*sl2) } }`` with the current sums; the first
    accepted position in cyclic order from ``st`` wins, positions before ``st`` only if sweep cur+1 is allowed.

    A level can change only where slx > 0 and np.rint(x*sl2/slx) != L, clamped at the top (np.rint is
    nearest_int within ±2**22; beyond that, or for NaN, it differs from every level, and the clamp is skipped
    when any value is out of range, where C's result is arbitrary): that superset is found at full width,
    the exact test runs on it alone. x, L, wxl, wl2: [n, B] C-contiguous; sumlx .. st: [B] (a column whose
    sumlx is -inf never moves). Returns (idx, col, pos, sweep, new_l, new_wxl, new_wl2, slx, sl2) of the moving
    columns (idx: the flat index pos*B + col), col ascending."""
    n, B = x.shape
    if scratch is None:
        scratch = (np.empty_like(x), np.empty_like(x), np.empty(x.shape, bool), np.empty(x.shape, bool))
    slx, v, m, m2 = scratch
    np.subtract(sumlx, wxl, out=slx)
    np.subtract(suml2, wl2, out=v)  # sl2
    v *= x
    v /= slx
    np.rint(v, out=v)
    if v.max(initial=-np.inf) < _NEAREST_INT_RANGE:  # (False for NaN) then the clamp at the top is C's
        np.minimum(v, _F32(nmax - 1), out=v)
    np.not_equal(v, L, out=m)
    np.greater(slx, 0, out=m2)
    m &= m2
    idx = np.flatnonzero(m)
    pos, col = np.divmod(idx, B)
    slx = slx.reshape(-1)[idx]
    sx, s2c = sumlx[col], suml2[col]
    xi = x.reshape(-1)[idx]
    sl2 = s2c - wl2.reshape(-1)[idx]  # the same float operations as at full width
    new_l = _clamped_nearest(xi * sl2 / slx, -nmax, nmax - 1)
    w = xi * xi
    new_wxl = w * xi * new_l
    new_wl2 = w * new_l * new_l
    slx += new_wxl
    sl2 += new_wl2
    c_st = st[col]
    sweep = cur[col] + (pos < c_st)
    ok = (new_l != L.reshape(-1)[idx]) & (sweep <= 4) & (sl2 > 0) & (slx * slx * s2c > sx * sx * sl2)
    k = np.flatnonzero(ok)
    key = col[k] * n + (pos[k] - c_st[k]) % n  # column, then rank in its cyclic order
    k = k[np.argsort(key, kind="stable")]  # a few ascending runs (one per position): timsort merges them
    c = col[k]
    first = np.ones(k.size, bool)
    first[1:] = c[1:] != c[:-1]
    k = k[first]
    return idx[k], col[k], pos[k], sweep[k], new_l[k], new_wxl[k], new_wl2[k], slx[k], sl2[k]


def _q3_apply(moves, L, wxl, wl2, sumlx, suml2, cur, st) -> np.ndarray:
    """Apply :func:`_q3_next_moves`' moves in place; returns the moved columns that may move again (a move at
    the last position of the fifth sweep ends the search)."""
    idx, col, pos, sweep, new_l, new_wxl, new_wl2, slx, sl2 = moves
    L.reshape(-1)[idx] = new_l
    wxl.reshape(-1)[idx] = new_wxl
    wl2.reshape(-1)[idx] = new_wl2
    sumlx[col] = slx
    suml2[col] = sl2
    last = pos == L.shape[0] - 1
    cur[col] = sweep + last
    st[col] = np.where(last, 0, pos + 1)
    return col[cur[col] <= 4]


def make_qkx3_quants(x: np.ndarray, nmax: int, w: np.ndarray, rmin: float, rdelta: float, nstep: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric weighted levels in [0, nmax] with an offset min <= 0 (make_qkx3_quants, squared error).

    For is = 0..nstep: levels at iscale = (rmin + rdelta*is + nmax)/(max - min), the weighted least-squares
    (scale, min) for them, kept if the weighted squared error drops. ``min`` is the best fit so far, so each
    candidate's levels depend on the earlier winners: the candidates run in order, vectorised over groups.
    Returns (scale [B], the_min [B] = -min, L [n, B] uint8)."""
    vmin = x.min(axis=0)
    vmax = x.max(axis=0)
    sum_w = seq_sum(w, from_zero=False)  # C starts these two at element 0, not at 0.0
    sum_x = seq_sum(w * x, from_zero=False)
    vmin = np.where(vmin > 0, _F32(0), vmin)
    live = vmax > vmin
    iscale = _F32(nmax) / np.where(live, vmax - vmin, _F32(1))
    scale = _F32(1) / iscale
    L = _clamped_nearest(iscale * (x - vmin), 0, nmax)
    diff = scale * L + vmin - x
    best_mad = seq_sum(w * (diff * diff))

    l = np.empty_like(x)
    wl = np.empty_like(x)
    p = np.empty_like(x)
    won = np.zeros(vmin.shape, dtype=bool)  # has a candidate won? its iscale and the min it started from:
    won_iscale = np.zeros_like(vmin)
    won_vmin = np.zeros_like(vmin)
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (vmax - vmin)
        _qkx_levels(x, iscale, vmin, vmax, nmax, out=l)
        np.multiply(w, l, out=wl)
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(np.multiply(wl, l, out=p))
        sum_xl = seq_sum(np.multiply(wl, x, out=p))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0  # no positive offsets: refit the scale alone
        this_min = np.where(clamp, _F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        np.multiply(l, this_scale, out=p)  # diff = this_scale*l + this_min - x
        p += this_min
        p -= x
        np.multiply(p, p, out=p)
        p *= w
        mad = seq_sum(p)
        better = live & (D > 0) & (mad < best_mad)
        won |= better
        won_iscale = np.where(better, iscale, won_iscale)
        won_vmin = np.where(better, vmin, won_vmin)
        best_mad = np.where(better, mad, best_mad)
        scale = np.where(better, this_scale, scale)
        vmin = np.where(better, this_min, vmin)

    if won.any():  # the winners' levels (C copies them out of Laux when they win)
        L[:, won] = _qkx_levels(x[:, won], won_iscale[won], won_vmin[won], vmax[won], nmax)
    L = L.astype(np.uint8)
    L[:, ~live] = 0
    return np.where(live, scale, _F32(0)), -vmin, L


def _qkx_levels(x: np.ndarray, iscale: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, nmax: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """make_qkx3_quants' candidate levels, C's ``v = iscale*(x - min); l = v > 0 ? nearest_int(MIN(v, nmax)) : 0``
    as float32 [n, B] (|v| is clipped before rounding, so np.rint is exact)."""
    l = np.subtract(x, vmin, out=out)
    np.multiply(l, iscale, out=l)
    np.clip(l, 0, nmax, out=l)
    np.rint(l, out=l)
    bad = ~np.isfinite(iscale) | ~np.isfinite(vmax - vmin)  # where v can be NaN (0 * inf): C takes 0
    if bad.any():
        l[:, bad] = np.nan_to_num(l[:, bad], nan=0.0)
    return l


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The stored levels, from the fp16-rounded sub-block scale d [B]: clamp(nearest_int(x/d), lo, hi) - lo,
    except where d == 0, which keep the search's levels (C's ``if (!d) continue``). x, L: [n, B]."""
    fresh = (np.clip(nearest_int(x / d), lo, hi) - lo).astype(np.uint8)
    keep = d == 0
    if keep.any():
        fresh[:, keep] = L[:, keep]
    return fresh


def _requantize_rows(x: np.ndarray, L: np.ndarray, d: np.ndarray, lo: int, hi: int, work: Workspace | None = None,
                     rows_per_pass: int = 1 << 13) -> np.ndarray:
    """:func:`_requantize` for groups as rows: x [B, n] (one group per row), d [B]; L [n, B] as the search
    returned it. Returns uint8 [B, n], in the element order the packers read."""
    B, n = x.shape
    out = np.empty((B, n), np.uint8)
    bias = np.int32(0x00400000 + lo)
    for r0 in range(0, B, rows_per_pass):
        r1 = min(B, r0 + rows_per_pass)
        t = work.get("rq", (r1 - r0, n)) if work is not None else np.empty((r1 - r0, n), _F32)
        np.divide(x[r0:r1], d[r0:r1, None], out=t)
        t += _F32(12582912.0)  # nearest_int, in place: the int32 bits, masked, offset
        bits = t.view(np.int32)
        bits &= 0x007FFFFF
        np.clip(bits, bias, bias + (hi - lo), out=bits)
        bits -= bias
        np.copyto(out[r0:r1], bits, casting="unsafe")
    keep = np.flatnonzero(d == 0)  # C's ``if (!d) continue``: the search's levels stay
    if keep.size:
        out[keep] = L[:, keep].T
    return out


# ------------------------------------------------------------------------------------------------------------
# bit packing


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """lo | hi << 4 in uint8, as C's ``y.qs[j] = xi0; y.qs[j] |= xi1 << 4`` (no masking of lo)."""
    return lo | (hi << 4)


def _crumbs(q: np.ndarray, axis: int) -> np.ndarray:
    """Four 2-bit fields along ``axis`` (of length 4) into one byte: q0 | q1 << 2 | q2 << 4 | q3 << 6."""
    q0, q1, q2, q3 = np.moveaxis(q, axis, 0)
    return q0 | (q1 << 2) | (q2 << 4) | (q3 << 6)


def _lanes_fifth_bits(q: np.ndarray) -> np.ndarray:
    """Q5's qh from levels in lanes layout [8, 4B] uint8: bit 4 of element j -> bit j of a uint32 [B]."""
    h = ((q >> 4) & 1).view("<u4")  # [8, B]: byte `lane` of word k is element 4k + lane's bit
    nib = (h | (h >> 7) | (h >> 14) | (h >> 21)) & 0xF  # ... moved to bit `lane`
    qh = nib[0].copy()
    for k in range(1, 8):
        qh |= nib[k] << (4 * k)
    return qh


def pack_q3_k_scales(ls: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales [nsb, 16] (0..63) into Q3_K's 12 bytes [nsb, 12]."""
    low = ls & 0xF
    top = (ls >> 4).reshape(-1, 4, 4)  # [nsb, g, m] for scale 4g + m
    return np.concatenate([_nibbles(low[:, :8], low[:, 8:]), _crumbs(top, axis=1)], axis=1)


def unpack_q3_k_scales(b: np.ndarray) -> np.ndarray:
    """Inverse of pack_q3_k_scales: [nsb, 12] -> [nsb, 16] values 0..63."""
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    top = (b[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3  # [nsb, g, m]
    return low | (top.reshape(-1, 16) << 4)


_EVERY_BYTE = np.uint64(0x0101010101010101)


def _words(L: np.ndarray) -> np.ndarray:
    """Levels [nsb, 256] uint8 as 8-level little-endian words [nsb, 32]: the packing below works on eight
    levels at once; its fields and shifts never cross a byte boundary."""
    return np.ascontiguousarray(L).view("<u8")


def _pack_q6_k(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels [nsb, 256] (0..63) -> ql [nsb, 128], qh [nsb, 64]."""
    q = _words(L).reshape(-1, 2, 4, 4)  # [nsb, half, quarter, word]
    low = q & (_EVERY_BYTE * np.uint64(0x0F))
    ql = _nibbles(low[:, :, :2], low[:, :, 2:])  # quarters 0 | 2 << 4, then 1 | 3 << 4
    qh = _crumbs((q >> np.uint64(4)) & (_EVERY_BYTE * np.uint64(3)), axis=2)
    return ql.reshape(len(L), -1).view(np.uint8), qh.reshape(len(L), -1).view(np.uint8)


def _pack_q3_k(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels [nsb, 256] (0..7) -> hmask [nsb, 32], qs [nsb, 64]."""
    q = _words(L)
    high = ((q >> np.uint64(2)) & _EVERY_BYTE).reshape(-1, 8, 4)  # [nsb, j // 32, word]
    hmask = high[:, 0].copy()
    for bit in range(1, 8):
        hmask |= high[:, bit] << np.uint64(bit)
    qs = _crumbs((q & (_EVERY_BYTE * np.uint64(3))).reshape(-1, 2, 4, 4), axis=2)
    return hmask.view(np.uint8), qs.reshape(len(L), -1).view(np.uint8)


# ------------------------------------------------------------------------------------------------------------
# packing from levels chosen elsewhere (formats.gguf.refine picks its own levels for the encoders' scales)


def pack_levels(name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
                scales: np.ndarray | None = None) -> np.ndarray:
    """Blocks of ``name`` as uint8 ``[B, type_size]`` from levels in element order and the block fields.

    Q8_0: q int8 ``[B, 32]``, d ``[B]``. Q4_0/Q4_1/Q5_0/Q5_1: q uint8 ``[B, 32]`` (0..15 / 0..31), d (and m for
    the offset types) ``[B]``. Q6_K: q uint8 ``[B, 256]`` (0..63), the int8 sub-scales ``scales [B, 16]``, d ``[B]``.
    Q3_K: q uint8 ``[B, 256]`` (0..7, the level + 4), the 6-bit sub-scales ``scales [B, 16]`` (0..63, the scale
    + 32), d ``[B]``. d and m are stored as fp16 (round to nearest even, as the encoders do)."""
    n_blocks = q.shape[0]
    if name == "Q3_K":
        out = _new_blocks("Q3_K", n_blocks)
        out["hmask"], out["qs"] = _pack_q3_k(np.ascontiguousarray(q, dtype=np.uint8))
        out["scales"] = pack_q3_k_scales(np.asarray(scales, dtype=np.uint8))
        out["d"] = d
    elif name == "Q8_0":
        out = _new_blocks("Q8_0", n_blocks)
        out["d"] = d
        out["qs"] = q.astype(np.int8)
    elif name == "Q6_K":
        out = _new_blocks("Q6_K", n_blocks)
        out["ql"], out["qh"] = _pack_q6_k(np.ascontiguousarray(q, dtype=np.uint8))
        out["scales"] = scales
        out["d"] = d
    else:
        # element order [B, 32] -> lanes [8, 4B] (row k: elements 4k..4k+3 of every block)
        lanes = np.ascontiguousarray(q.astype(np.uint8).reshape(n_blocks, 8, 4).transpose(1, 0, 2)).reshape(8, -1)
        out = (_q4_blocks if name.startswith("Q4") else _q5_blocks)(name, lanes, d, m)
    return out.view(np.uint8).reshape(n_blocks, -1)


def block_fields(name: str, raw: np.ndarray) -> np.ndarray:
    """Raw blocks (uint8, any shape whose bytes are whole blocks) viewed as the structured block array of
    ``name`` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q3_K): fields d, m, qs, qh, scales ... by name."""
    return _blocks_of(name, raw)


# ------------------------------------------------------------------------------------------------------------
# driver


def _encode_rows(name: str, rows: np.ndarray, imatrix: np.ndarray | None, encode_chunk: Callable,
                 *per_row: np.ndarray) -> np.ndarray:
    """Encode [n_rows, n_per_row] a few rows at a time: ``encode_chunk(rows[r0:r1], imatrix, *(a[r0:r1] for a
    in per_row))`` returns those rows' blocks (any dtype whose bytes are the rows' bytes)."""
    n_rows, n_per_row = rows.shape
    row_bytes = quants.row_bytes(name, n_per_row)
    out = np.empty((n_rows, row_bytes), np.uint8)
    chunk = CHUNK_VALUES.get((name, imatrix is not None), CHUNK_VALUES["default"])
    step = max(1, chunk // n_per_row)
    # Degenerate groups (all zero, subnormal, huge) make inf/NaN on purpose, exactly as the C code does.
    with np.errstate(all="ignore"):
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            blocks = encode_chunk(rows[r0:r1], imatrix, *(a[r0:r1] for a in per_row))
            out[r0:r1] = blocks.view(np.uint8).reshape(r1 - r0, row_bytes)
    return out


def _row_sigma2(rows: np.ndarray) -> np.ndarray:
    """The legacy imatrix paths' sigma2 = sum_x2 / n_per_row, with sum_x2 accumulated in C's order: [n_rows]."""
    n_rows, n = rows.shape
    sum_x2 = np.empty(n_rows, _F32)
    step = max(1, (1 << 20) // n)  # rows per pass: n sequential adds of `step`-long (strided) columns
    with np.errstate(all="ignore"):
        for r0 in range(0, n_rows, step):
            sum_x2[r0:r0 + step] = seq_sum(np.square(rows[r0:r0 + step]).T)
        return sum_x2 / _F32(n)


def _imatrix_columns(qw: np.ndarray, n_rows: int, n: int) -> np.ndarray:
    """The importance of each value of a chunk of n_rows rows (qw: [n_per_row]), position-major: [n, B].
    Every row has the same importances, so the small [n, n_per_row/n] transpose is tiled n_rows times."""
    return np.tile(qw.reshape(-1, n).T, (1, n_rows))


def _new_blocks(name: str, count: int) -> np.ndarray:
    return np.empty(count, _BLOCKS[name])


# ------------------------------------------------------------------------------------------------------------
# float types


def _encode_f32(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    return rows.astype("<f4").view(np.uint8)  # a copy: the caller may reuse its array


def _f16_chunk(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2")


def _bf16_chunk(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even on the top 16 bits; NaN kept, forced quiet."""
    u = x.view(np.uint32)
    bits = u >> 16
    bits &= 1  # the lowest kept bit decides ties
    bits += 0x7FFF
    bits += u
    bits >>= 16
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = (u[nan] >> 16) | 64
    return bits.astype("<u2")


def _decode_f32(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype(_F32).reshape(-1, n_per_row)


def _decode_f16(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(_F32).reshape(-1, n_per_row)


def _decode_bf16(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return bits.view(_F32).reshape(-1, n_per_row)


# ------------------------------------------------------------------------------------------------------------
# legacy 32-value types, reference quantizers (quantize_row_q*_ref), in lanes layout xl: [8, 4B]


def _q8_0_ref(x: np.ndarray) -> np.ndarray:
    xl = _lanes(x)
    d = _lanes_max(np.abs(xl)) / _F32(127)
    q = c_roundf_int32(xl * _per_lane(_safe_inverse(d))).astype(np.int8)
    out = _new_blocks("Q8_0", d.size)
    out["d"] = d
    out["qs"] = _unlane_bytes(q)
    return out


def _lanes_signed_absmax(x: np.ndarray, xl: np.ndarray) -> np.ndarray:
    """signed_absmax of each block of the chunk x, from its lanes layout xl (finite values)."""
    return _signed_extreme(_lanes_max(xl), _lanes_min(xl), x.reshape(-1, QK))


def _int8_min(q: np.ndarray, top: int) -> np.ndarray:
    """C's ``MIN(top, (int8_t)v)`` stored as uint8 (numpy's int8 minimum is far faster against an array)."""
    return np.minimum(q, np.full_like(q, top)).view(np.uint8)


def _q4_0_ref(x: np.ndarray) -> np.ndarray:
    xl = _lanes(x)
    d = _lanes_signed_absmax(x, xl) / _F32(-8)  # the extreme value maps to level 0
    q = c_int32(xl * _per_lane(_safe_inverse(d)) + _F32(8.5)).astype(np.int8)
    return _q4_blocks("Q4_0", _int8_min(q, 15), d)


def _q4_1_ref(x: np.ndarray) -> np.ndarray:
    xl = _lanes(x)
    vmin = _lanes_min(xl)
    d = (_lanes_max(xl) - vmin) / _F32(15)
    q = c_int32((xl - _per_lane(vmin)) * _per_lane(_safe_inverse(d)) + _F32(0.5)).astype(np.int8)
    return _q4_blocks("Q4_1", _int8_min(q, 15), d, vmin)


def _q5_0_ref(x: np.ndarray) -> np.ndarray:
    xl = _lanes(x)
    d = _lanes_signed_absmax(x, xl) / _F32(-16)
    q = c_int32(xl * _per_lane(_safe_inverse(d)) + _F32(16.5)).astype(np.int8)
    return _q5_blocks("Q5_0", _int8_min(q, 31), d)


def _q5_1_ref(x: np.ndarray) -> np.ndarray:
    xl = _lanes(x)
    vmin = _lanes_min(xl)
    d = (_lanes_max(xl) - vmin) / _F32(31)
    q = c_int32((xl - _per_lane(vmin)) * _per_lane(_safe_inverse(d)) + _F32(0.5)).astype(np.uint8)
    return _q5_blocks("Q5_1", q, d, vmin)


def _q4_blocks(name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Q4_0/Q4_1 blocks from levels in lanes layout q [8, 4B] uint8 and fp32 d [B] (and m)."""
    out = _new_blocks(name, d.size)
    out["d"] = d
    if m is not None:
        out["m"] = m
    out["qs"] = _unlane_bytes(_nibbles(q[:4], q[4:]))  # lanes rows 0-3 hold elements 0-15
    return out


def _q5_blocks(name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Q5_0/Q5_1 blocks from levels in lanes layout q [8, 4B] uint8: low nibbles in qs, bit 4 in qh."""
    out = _new_blocks(name, d.size)
    out["d"] = d
    if m is not None:
        out["m"] = m
    out["qh"] = _lanes_fifth_bits(q)
    out["qs"] = _unlane_bytes(_nibbles(q[:4] & 0xF, q[4:] & 0xF))
    return out


# legacy 32-value types with an importance matrix (quantize_row_q*_impl), position-major x, qw: [32, B]


# the imatrix searches: make_qx_quants (symmetric, levels stored as found) or make_qkx3_quants (with a min)
_LEGACY_SEARCH = {"Q4_0": ("symmetric", 8), "Q5_0": ("symmetric", 16), "Q4_1": ("offset", 15), "Q5_1": ("offset", 31)}


def _legacy_impl(name: str, x: np.ndarray, imatrix: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """quantize_row_q*_impl: per-value weights qw * sqrt(sigma2 + x^2) (sigma2: the row's mean square), then
    one search per block; d (and m = -min) are stored as the search returns them, without requantization."""
    kind, nmax = _LEGACY_SEARCH[name]
    xt = _positions_first(x, QK)
    w = _imatrix_columns(imatrix, len(x), QK) * np.sqrt(np.repeat(sigma2, x.shape[1] // QK) + xt * xt)
    m = None
    if kind == "symmetric":
        d, L = make_qx_quants(xt, nmax, w)
    else:
        d, the_min, L = make_qkx3_quants(xt, nmax, w, -0.9, 0.05, 36)
        m = -the_min
    q = L.reshape(QK // 4, 4, -1).transpose(0, 2, 1).reshape(QK // 4, -1)  # position-major -> lanes
    return (_q4_blocks if name.startswith("Q4") else _q5_blocks)(name, q, d, m)


# ------------------------------------------------------------------------------------------------------------
# Q6_K and Q3_K: 256-value super-blocks of sixteen 16-value sub-blocks; x, qw: [16, B], B = 16 * nsb


def _q6_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """quantize_row_q6_K_ref / _impl: make_qx_quants(16, 32) per sub-block (weights x^2, or the imatrix as
    is), int8 sub-scales from iscale = -128/max_scale, levels requantized with the fp16 d."""
    nsb = x.size // QK_K
    xt = _positions_first(x, 16)
    w = xt * xt if imatrix is None else _imatrix_columns(imatrix, len(x), 16)
    scale, L = make_qx_quants(xt, 32, w)
    scales = scale.reshape(nsb, 16)
    max_scale = signed_absmax(scales, axis=1)
    live = np.abs(max_scale) >= GROUP_MAX_EPS
    iscale = _F32(-128) / np.where(live, max_scale, _F32(1))
    d = fp16_round(_F32(1) / iscale)
    sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    L = _requantize(xt, L, (d[:, None] * sc).reshape(-1), -32, 31)
    out = _new_blocks("Q6_K", nsb)
    out["ql"], out["qh"] = _pack_q6_k(L.T.reshape(nsb, QK_K))
    out["scales"] = sc
    out["d"] = d
    out.view(np.uint8).reshape(nsb, -1)[~live] = 0  # an all-zero super-block is stored as zero bytes
    return out


def _q3_k_ref_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q3_K_ref's 6-bit sub-scales from iscale = -32/max_scale: (ls [nsb, 16] 0..63, d [nsb])."""
    max_scale = signed_absmax(scales, axis=1)
    nonzero = max_scale != 0
    iscale = _F32(-32) / np.where(nonzero, max_scale, _F32(1))
    ls = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + 32
    ls = np.where(nonzero[:, None], ls, 0).astype(np.uint8)
    return ls, np.where(nonzero, _F32(1) / iscale, _F32(0))


def _q3_k_impl_search(x: np.ndarray, xt: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q3_K_impl's search: weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over the
    super-block; make_qx_quants(16, 4) per sub-block, then make_qx_quants(16, 32) over the sixteen sub-scales
    weighted by each sub-block's weight sum. Returns (L [16, B], ls [nsb, 16] 0..63, d [nsb])."""
    nsb = x.size // QK_K
    sum_x2 = seq_sum(np.square(x.reshape(nsb, QK_K)).T)
    sigma2 = _F32(2) * sum_x2 / _F32(QK_K)
    w = qw * np.sqrt(np.repeat(sigma2, 16) + xt * xt)
    scale, L = make_qx_quants(xt, 4, w)
    d, ls = make_qx_quants(_positions_first(scale, 16), 32, _positions_first(seq_sum(w), 16))
    return L, np.ascontiguousarray(ls.T), d


def _q3_k(x: np.ndarray, imatrix: np.ndarray | None, work: Workspace | None = None) -> np.ndarray:
    nsb = x.size // QK_K
    if imatrix is None:
        scale, L = make_q3_quants(x.reshape(-1, 16), 4, work, by_rows=True)
        ls, d = _q3_k_ref_scales(scale.reshape(nsb, 16))
        d = fp16_round(d)
        sub_d = d[:, None] * (ls.astype(np.int8) - np.int8(32))  # [nsb, 16]
        q = _requantize_rows(x.reshape(-1, 16), L, sub_d.reshape(-1), -4, 3, work)
    else:
        xt = _positions_first(x, 16)
        L, ls, d = _q3_k_impl_search(x, xt, _imatrix_columns(imatrix, len(x), 16))
        d = fp16_round(d)
        sub_d = d[:, None] * (ls.astype(np.int8) - np.int8(32))  # [nsb, 16]
        q = _requantize(xt, L, sub_d.reshape(-1), -4, 3).T
    out = _new_blocks("Q3_K", nsb)
    out["hmask"], out["qs"] = _pack_q3_k(q.reshape(nsb, QK_K))
    out["scales"] = pack_q3_k_scales(ls)
    out["d"] = d
    return out


# ------------------------------------------------------------------------------------------------------------
# decoders (dequantize_row_* in ggml-quants.c: the same float32 products)


def _blocks_of(name: str, raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1).view(_BLOCKS[name])


def _field(blocks: np.ndarray, name: str = "d") -> np.ndarray:
    """A per-block fp16 field as float32 [B, 1]."""
    return blocks[name].astype(_F32)[:, None]


def _legacy_levels(blocks: np.ndarray) -> np.ndarray:
    """Q4/Q5 levels [B, 32] int32: nibbles (j low, j+16 high), plus for Q5 bit j of qh as bit 4."""
    qs = blocks["qs"]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)
    if "qh" in blocks.dtype.names:
        q |= ((blocks["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
    return q


def _decode_q8_0(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    b = _blocks_of("Q8_0", raw)
    return (b["qs"].astype(_F32) * _field(b)).reshape(-1, n_per_row)


def _symmetric_decoder(name: str, offset: int) -> Callable:
    def decode(raw: np.ndarray, n_per_row: int) -> np.ndarray:
        b = _blocks_of(name, raw)
        return ((_legacy_levels(b) - offset).astype(_F32) * _field(b)).reshape(-1, n_per_row)
    return decode


def _offset_decoder(name: str) -> Callable:
    def decode(raw: np.ndarray, n_per_row: int) -> np.ndarray:
        b = _blocks_of(name, raw)
        return (_legacy_levels(b).astype(_F32) * _field(b) + _field(b, "m")).reshape(-1, n_per_row)
    return decode


def _decode_q6_k(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    b = _blocks_of("Q6_K", raw)
    ql = b["ql"].reshape(-1, 2, 2, 32)  # [nsb, half, quarter % 2, lane]
    qh = b["qh"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]  # [nsb, half, quarter, lane]
    q = (np.concatenate([ql & 0xF, ql >> 4], axis=2) | ((qh & 3) << 4)).astype(np.int32) - 32
    sub_d = _field(b) * b["scales"].astype(_F32)  # [nsb, 16]: C's d * sc * q == (d * sc) * q
    return (sub_d[:, :, None] * q.reshape(-1, 16, 16).astype(_F32)).reshape(-1, n_per_row)


def _decode_q3_k(raw: np.ndarray, n_per_row: int) -> np.ndarray:
    b = _blocks_of("Q3_K", raw)
    sub_d = _field(b) * (unpack_q3_k_scales(b["scales"]).astype(np.int32) - 32).astype(_F32)  # [nsb, 16]
    low = (b["qs"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [nsb, half, 4, lane]
    high = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [nsb, j // 32, lane]
    q = low.reshape(-1, QK_K).astype(np.int32) - 4 * (1 - high.reshape(-1, QK_K).astype(np.int32))
    return (sub_d[:, :, None] * q.reshape(-1, 16, 16).astype(_F32)).reshape(-1, n_per_row)


# ------------------------------------------------------------------------------------------------------------
# registration


def _encoder(name: str, encode_chunk: Callable, row_sigma2: bool = False) -> Callable:
    """The contract's encode(rows, imatrix) for a chunk quantizer ``encode_chunk(x, imatrix, *per_row)``;
    ``row_sigma2``: the imatrix path needs each row's mean square (summed over the whole row, so up front)."""
    def encode(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        per_row = (_row_sigma2(rows),) if row_sigma2 and imatrix is not None else ()
        return _encode_rows(name, rows, imatrix, encode_chunk, *per_row)
    return encode


def _ignores_imatrix(encode_chunk: Callable) -> Callable:
    return lambda x, imatrix: encode_chunk(x)


def _legacy(ref: Callable, name: str) -> Callable:
    def encode_chunk(x: np.ndarray, imatrix: np.ndarray | None, sigma2: np.ndarray | None = None) -> np.ndarray:
        return ref(x) if imatrix is None else _legacy_impl(name, x, imatrix, sigma2)
    return encode_chunk


# Values per chunk, by (type, with imatrix): large enough to amortise numpy's per-call overhead, small enough
# that the handful of live [n, B] temporaries stay in cache (a fresh, uncached temporary costs several times
# the arithmetic on it). Q3_K without imatrix blocks its own full-width work (make_q3_quants' _Q3_BLOCK, in a
# Workspace) and takes large chunks so that its coordinate-descent rounds pool the few searching groups of many
# blocks.
CHUNK_VALUES: dict = {"default": 1 << 17, ("Q3_K", False): 1 << 21}

quants.register("F32", _encode_f32, _decode_f32)
quants.register("F16", _encoder("F16", _ignores_imatrix(_f16_chunk)), _decode_f16)
quants.register("BF16", _encoder("BF16", _ignores_imatrix(_bf16_chunk)), _decode_bf16)
quants.register("Q8_0", _encoder("Q8_0", _ignores_imatrix(_q8_0_ref)), _decode_q8_0)
quants.register("Q4_0", _encoder("Q4_0", _legacy(_q4_0_ref, "Q4_0"), True), _symmetric_decoder("Q4_0", 8))
quants.register("Q4_1", _encoder("Q4_1", _legacy(_q4_1_ref, "Q4_1"), True), _offset_decoder("Q4_1"))
quants.register("Q5_0", _encoder("Q5_0", _legacy(_q5_0_ref, "Q5_0"), True), _symmetric_decoder("Q5_0", 16))
quants.register("Q5_1", _encoder("Q5_1", _legacy(_q5_1_ref, "Q5_1"), True), _offset_decoder("Q5_1"))
quants.register("Q6_K", _encoder("Q6_K", _q6_k), _decode_q6_k)
def _encode_q3_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    if imatrix is not None:
        return _encode_rows("Q3_K", rows, imatrix, _q3_k)
    work = Workspace()  # one set of buffers for all chunks of this tensor
    return _encode_rows("Q3_K", rows, None, lambda x, _: _q3_k(x, None, work))


quants.register("Q3_K", _encode_q3_k, _decode_q3_k)
