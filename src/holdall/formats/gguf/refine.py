"""GPTQ-style error feedback inside llama.cpp's fixed block formats: better codes for the same bytes layout.

llama.cpp's imatrix encoders round every weight of a block onto that block's grid independently, weighting the
error of column ``j`` by its importance ``H_jj`` (the mean squared input). What a linear's output loses is the
full quadratic form ``(w − ŵ) H (w − ŵ)ᵀ`` per row, ``H = mean xᵀx`` over calibration tokens, and its
off-diagonal part is large for real activations (columns are correlated). This module keeps the format — every
block's scale fields have the type's widths, every code its range, the bytes are the ggml layout llama.cpp reads
unmodified — and chooses the contents against the full ``H``:

1. **Scales.** The imatrix encoder (``quants.quantize(rows, type, diag H)``, byte-equal to llama-quantize
   --imatrix) picks every block's scale (and min); they are read back out of its bytes, so the grid is exactly
   what the decoder will use.
2. **Codes by error feedback.** With those grids fixed, columns are rounded one at a time (in order of
   decreasing ``H_jj`` — act-order is free here because no scale is fitted during the loop), each onto its own
   block's grid for its row (``a·q + b``, ``q`` in the type's code range), and the rounding error is pushed into
   the columns not yet rounded through the upper Cholesky factor ``U`` of ``H⁻¹`` (GPTQ, Frantar et al. 2022;
   lazy batches of ``block_size`` columns).
3. **Scales re-fitted.** For those codes, every row's block parameters are solved jointly by least squares in
   the ``H`` norm (not block by block: the blocks of a row interact through ``H``), rounded to the type's scale
   fields (fp16 ``d``/``m``; the 4-bit, 6-bit or int8 sub-block scales under a fresh super-block ``d``), and the
   codes are chosen again by error feedback on the new grids (``iterations`` times).
4. **Per-row choice.** Rows are independent in the output and in the bytes, so each row keeps whichever
   candidate — the imatrix encoder's own bytes, the error-feedback codes, the re-fitted ones — has the smallest
   ``(w − ŵ) H (w − ŵ)ᵀ`` as decoded from its bytes. The result is therefore never worse than the imatrix
   encoder on the calibration objective, row by row.

Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-value blocks) and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-value super-blocks) —
every block type llama.cpp's file types use. The k-quants' fields, as the handlers below parse and re-fit them:

* Q6_K: sixteen int8 sub-scales under an fp16 ``d``; ``x = d·sc·(q − 32)``, ``q`` 0..63.
* Q4_K / Q5_K: eight 6-bit scales and 6-bit mins under fp16 ``d`` and ``dmin``; ``x = d·sc·q − dmin·m``.
* Q3_K: sixteen signed 6-bit sub-scales (stored + 32) under an fp16 ``d``; ``x = d·(sc − 32)·(q − 4)``, ``q`` 0..7
  (symmetric levels −4..3). Re-fitted scales put the one of largest magnitude at −32 steps of ``d`` (``d`` takes
  its sign), as quantize_row_q3_K_ref does, so the signed range is used in full.
* Q2_K: sixteen 4-bit scales and 4-bit mins under fp16 ``d`` and ``dmin``; ``x = d·sc·q − dmin·m``, ``q`` 0..3.
  Negative least-squares scales and positive offsets are not storable and are clipped to 0.

The float types go through their encoder unchanged (``RefineResult.notes`` says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import ConfigError, DataError
from . import quants

REFINED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_F32 = np.float32


# ------------------------------------------------------------------------------------------ per-type grids
#
# Every handler turns a type's bytes into per-group grids ``value = a·q + b`` (``a``, ``b``: float32
# ``[rows, groups]``, ``group`` values each) and back: ``pack(state, q)`` writes levels ``q`` with the (possibly
# re-fitted) scale fields of ``state``. ``n_params`` is 1 when ``b`` is tied to ``a`` (symmetric types,
# ``b = −zero·a``) and 2 when the type stores an independent offset; ``from_ls`` rounds least-squares parameters
# to the type's scale fields.


def _fp16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=_F32).astype(np.float16).astype(_F32)


class _Legacy:
    """Q8_0 / Q4_0 / Q5_0 (symmetric: x = d·(q − zero)) and Q4_1 / Q5_1 (x = d·q + m): 32-value blocks."""

    group = 32

    def __init__(self, name: str, qmin: int, qmax: int, zero: int | None):
        self.name, self.qmin, self.qmax, self.zero = name, qmin, qmax, zero
        self.n_params = 1 if zero is not None else 2

    def parse(self, raw: np.ndarray, n_rows: int) -> dict:
        from . import quants_legacy

        fields = quants_legacy.block_fields(self.name, raw)
        state = {"d": fields["d"].astype(_F32).reshape(n_rows, -1)}
        if self.zero is None:
            state["m"] = fields["m"].astype(_F32).reshape(n_rows, -1)
        return state

    def grid(self, state: dict) -> tuple[np.ndarray, np.ndarray]:
        d = state["d"]
        return d, (-_F32(self.zero) * d if self.zero is not None else state["m"])

    def from_ls(self, state: dict, a: np.ndarray, b: np.ndarray | None) -> dict:
        new = {"d": _fp16(a)}
        if self.zero is None:
            new["m"] = _fp16(b)
        return new

    def pack(self, state: dict, q: np.ndarray) -> np.ndarray:
        from . import quants_legacy

        n_rows = q.shape[0]
        m = state["m"].reshape(-1) if self.zero is None else None
        dtype = np.int8 if self.name == "Q8_0" else np.uint8
        blocks = quants_legacy.pack_levels(self.name, q.reshape(-1, 32).astype(dtype), state["d"].reshape(-1), m)
        return blocks.reshape(n_rows, -1)


class _ScaleMinGrid:
    """``value = (d·sc)·q − (dmin·m)`` per sub-block, with unsigned ``sc``/``m`` of ``scale_max`` levels under
    float16 ``d``/``dmin`` super-block scales (Q4_K/Q5_K: 8 sub-blocks, 6-bit; Q2_K: 16 sub-blocks, 4-bit)."""

    sub_blocks: int
    scale_max: int

    def grid(self, state: dict) -> tuple[np.ndarray, np.ndarray]:
        # the decoder's float32 products: (d·sc)·q − (dmin·m)
        a = state["d"][:, :, None] * state["sc"].astype(_F32)
        b = -(state["dmin"][:, :, None] * state["m"].astype(_F32))
        return a.reshape(len(a), -1), b.reshape(len(b), -1)

    def from_ls(self, state: dict, a: np.ndarray, b: np.ndarray | None) -> dict:
        n_rows = a.shape[0]
        a = np.maximum(a.reshape(n_rows, -1, self.sub_blocks), 0)  # sc is unsigned: a negative scale is not storable
        neg_b = np.maximum(-b.reshape(n_rows, -1, self.sub_blocks), 0)  # so is m: offsets are <= 0
        d, sc = _unsigned_levels(a, self.scale_max)
        dmin, m = _unsigned_levels(neg_b, self.scale_max)
        return {"d": d, "dmin": dmin, "sc": sc, "m": m}


class _K4(_ScaleMinGrid):
    """Q4_K / Q5_K: super-blocks of 256 with fp16 d, dmin and eight 6-bit (sc, m); x = d·sc·q − dmin·m."""

    group = 32
    n_params = 2
    qmin = 0
    sub_blocks, scale_max = 8, 63

    def __init__(self, name: str, qmax: int):
        self.name, self.qmax = name, qmax
        self.size = quants.TYPES[name][2]

    def parse(self, raw: np.ndarray, n_rows: int) -> dict:
        from . import quants_k

        blocks = np.ascontiguousarray(raw).reshape(-1, self.size)
        d = blocks[:, 0:2].copy().view("<f2").astype(_F32).reshape(n_rows, -1)
        dmin = blocks[:, 2:4].copy().view("<f2").astype(_F32).reshape(n_rows, -1)
        sc, m = quants_k.unpack_scales_k4(blocks[:, 4:16])
        return {"d": d, "dmin": dmin, "sc": sc.reshape(n_rows, -1, 8), "m": m.reshape(n_rows, -1, 8)}


    def pack(self, state: dict, q: np.ndarray) -> np.ndarray:
        from . import quants_k

        n_rows = q.shape[0]
        sc12 = quants_k.pack_scales_k4(state["sc"].reshape(-1, 8), state["m"].reshape(-1, 8))
        d = state["d"].reshape(-1).astype(np.float16)
        dmin = state["dmin"].reshape(-1).astype(np.float16)
        packer = quants_k.pack_q4_k if self.name == "Q4_K" else quants_k.pack_q5_k
        return packer(d, dmin, sc12, q.reshape(-1, 256).astype(np.uint8)).reshape(n_rows, -1)


def _unsigned_levels(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative sub-block values ``[R, S, k]`` -> (fp16 super-block step ``[R, S]``, levels 0..top): the
    largest value maps to ``top``, so the whole field (6-bit for Q4_K/Q5_K, 4-bit for Q2_K) is used."""
    step = _fp16(values.max(axis=2) / _F32(top))
    with np.errstate(all="ignore"):
        levels = np.where(step[:, :, None] > 0, np.rint(values / step[:, :, None]), 0)
    return step, np.clip(levels, 0, top).astype(np.uint8)


class _Q6K:
    """Q6_K: super-blocks of 256, fp16 d and sixteen int8 sub-scales; x = d·sc·(q − 32), q in 0..63."""

    name = "Q6_K"
    group = 16
    n_params = 1
    qmin, qmax, zero = 0, 63, 32

    def parse(self, raw: np.ndarray, n_rows: int) -> dict:
        from . import quants_legacy

        fields = quants_legacy.block_fields("Q6_K", raw)
        return {"d": fields["d"].astype(_F32).reshape(n_rows, -1), "sc": fields["scales"].reshape(n_rows, -1, 16)}

    def grid(self, state: dict) -> tuple[np.ndarray, np.ndarray]:
        a = (state["d"][:, :, None] * state["sc"].astype(_F32)).reshape(len(state["d"]), -1)
        return a, -_F32(32) * a

    def from_ls(self, state: dict, a: np.ndarray, b: np.ndarray | None) -> dict:
        a = a.reshape(a.shape[0], -1, 16)
        d = _fp16(np.abs(a).max(axis=2) / _F32(127))
        with np.errstate(all="ignore"):
            sc = np.where(d[:, :, None] > 0, np.rint(a / d[:, :, None]), 0)
        return {"d": d, "sc": np.clip(sc, -128, 127).astype(np.int8)}

    def pack(self, state: dict, q: np.ndarray) -> np.ndarray:
        from . import quants_legacy

        n_rows = q.shape[0]
        blocks = quants_legacy.pack_levels("Q6_K", q.reshape(-1, 256).astype(np.uint8), state["d"].reshape(-1),
                                           scales=state["sc"].reshape(-1, 16))
        return blocks.reshape(n_rows, -1)


class _Q3K:
    """Q3_K: super-blocks of 256, fp16 d and sixteen signed 6-bit sub-scales (stored + 32); x = d·(sc−32)·(q − 4),
    q in 0..7 (the 3-bit code: two bits in qs, the third in hmask)."""

    name = "Q3_K"
    group = 16
    n_params = 1
    qmin, qmax, zero = 0, 7, 4

    def parse(self, raw: np.ndarray, n_rows: int) -> dict:
        from . import quants_legacy

        fields = quants_legacy.block_fields("Q3_K", raw)
        sc = quants_legacy.unpack_q3_k_scales(fields["scales"])
        return {"d": fields["d"].astype(_F32).reshape(n_rows, -1), "sc": sc.reshape(n_rows, -1, 16)}

    def grid(self, state: dict) -> tuple[np.ndarray, np.ndarray]:
        # the decoder's float32 product d·(sc − 32), times the signed level (q − 4)
        a = (state["d"][:, :, None] * (state["sc"].astype(_F32) - _F32(32))).reshape(len(state["d"]), -1)
        return a, -_F32(4) * a

    def from_ls(self, state: dict, a: np.ndarray, b: np.ndarray | None) -> dict:
        # As quantize_row_q3_K_ref: the sub-scale of largest magnitude maps to −32 (d takes its sign), so the
        # signed range −32..31 is used in full whichever sign that scale has.
        a = a.reshape(a.shape[0], -1, 16)
        peak = np.take_along_axis(a, np.abs(a).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
        d = _fp16(peak / _F32(-32))
        with np.errstate(all="ignore"):
            sc = np.where(d[:, :, None] != 0, np.rint(a / d[:, :, None]), 0)
        return {"d": d, "sc": (np.clip(sc, -32, 31) + 32).astype(np.uint8)}

    def pack(self, state: dict, q: np.ndarray) -> np.ndarray:
        from . import quants_legacy

        n_rows = q.shape[0]
        blocks = quants_legacy.pack_levels("Q3_K", q.reshape(-1, 256).astype(np.uint8), state["d"].reshape(-1),
                                           scales=state["sc"].reshape(-1, 16))
        return blocks.reshape(n_rows, -1)


class _Q2K(_ScaleMinGrid):
    """Q2_K: super-blocks of 256 with fp16 d, dmin and sixteen 4-bit (sc, m); x = d·sc·q − dmin·m, q in 0..3."""

    name = "Q2_K"
    group = 16
    n_params = 2
    qmin, qmax = 0, 3
    sub_blocks, scale_max = 16, 15

    def parse(self, raw: np.ndarray, n_rows: int) -> dict:
        blocks = np.ascontiguousarray(raw).reshape(-1, 84)
        d = blocks[:, 80:82].copy().view("<f2").astype(_F32).reshape(n_rows, -1)
        dmin = blocks[:, 82:84].copy().view("<f2").astype(_F32).reshape(n_rows, -1)
        sc16 = blocks[:, 0:16]
        return {"d": d, "dmin": dmin, "sc": (sc16 & 0xF).reshape(n_rows, -1, 16),
                "m": (sc16 >> 4).reshape(n_rows, -1, 16)}


    def pack(self, state: dict, q: np.ndarray) -> np.ndarray:
        from . import quants_k

        n_rows = q.shape[0]
        sc16 = (state["sc"] | (state["m"] << 4)).reshape(-1, 16).astype(np.uint8)
        d = state["d"].reshape(-1).astype(np.float16)
        dmin = state["dmin"].reshape(-1).astype(np.float16)
        return quants_k.pack_q2_k(d, dmin, sc16, q.reshape(-1, 256).astype(np.uint8)).reshape(n_rows, -1)


_HANDLERS = {
    "Q8_0": _Legacy("Q8_0", -127, 127, 0),  # ±127: the range quantize_row_q8_0 itself produces
    "Q4_0": _Legacy("Q4_0", 0, 15, 8),
    "Q5_0": _Legacy("Q5_0", 0, 31, 16),
    "Q4_1": _Legacy("Q4_1", 0, 15, None),
    "Q5_1": _Legacy("Q5_1", 0, 31, None),
    "Q4_K": _K4("Q4_K", 15),
    "Q5_K": _K4("Q5_K", 31),
    "Q6_K": _Q6K(),
    "Q3_K": _Q3K(),
    "Q2_K": _Q2K(),
}


# ------------------------------------------------------------------------------------------ public API


@dataclass
class RefineResult:
    """One tensor refined by :func:`refine_tensor`.

    raw: the ggml bytes, uint8 ``[n_rows, row_bytes]``.
    errors: ``Σ_rows (w − ŵ) H (w − ŵ)ᵀ / n_rows`` of each candidate (``"imatrix"``, ``"gptq"``, ``"refit"``,
        ``"refit+gptq"`` ...) and of the chosen mix (``"chosen"``), decoded from bytes.
    chosen: how many rows each candidate supplied.
    notes: why a tensor was not refined (unsupported type, Hessian that would not factorize).
    """

    raw: np.ndarray
    errors: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def refine_tensor(
    rows: np.ndarray,
    qtype: str,
    hessian: np.ndarray,
    importance: np.ndarray | None = None,
    iterations: int = 1,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> RefineResult:
    """Encode ``rows`` (float32 ``[n_rows, n_per_row]``) as ``qtype`` with codes and scales chosen against the
    input Hessian ``hessian`` (``mean xᵀx``, ``[n_per_row, n_per_row]``).

    importance: the per-column importance given to the imatrix encoder that picks the starting scales
        (default: the Hessian's diagonal, which is what llama-imatrix measures).
    iterations: rounds of (re-fit the scales by least squares, choose codes again); 0 keeps the encoder's scales.
    act_order: round columns in order of decreasing ``H_jj`` (else left to right).
    damp: added to ``H``'s diagonal before inverting, as a fraction of its mean (GPTQ's percdamp).
    """
    name = quants.type_name(qtype)
    rows = np.ascontiguousarray(rows, dtype=_F32)
    if rows.ndim != 2:
        raise DataError(f"refine_tensor expects rows [n_rows, n_per_row], got shape {list(rows.shape)}")
    n_rows, n = rows.shape
    H = np.asarray(hessian, dtype=np.float64)
    if H.shape != (n, n):
        raise DataError(f"the Hessian is {list(H.shape)}, expected [{n}, {n}] for rows of {n} values")
    if not np.isfinite(H).all():
        raise DataError("the Hessian holds NaN or Inf values")
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"iterations must be an integer >= 0, got {iterations!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise ConfigError(f"damp must be a number >= 0, got {damp!r}")
    if importance is None:
        importance = np.diagonal(H).astype(_F32)
    start = quants.quantize(rows, name, importance)  # validates the row length and the values
    if name not in _HANDLERS:
        return RefineResult(start, notes=[f"{name} is not refined (supported: {', '.join(REFINED_TYPES)}); "
                                          "written by its encoder"])
    handler = _HANDLERS[name]
    perm = np.argsort(-np.diagonal(H), kind="stable") if act_order else None
    U = _inverse_factor(H if perm is None else H[np.ix_(perm, perm)], damp)  # U of the problem in rounding order
    if U is None:
        return RefineResult(start, notes=["the Hessian did not factorize even with 10^4 x the damping; written by "
                                          "the imatrix encoder"])

    candidates: dict[str, np.ndarray] = {"imatrix": start}
    state = handler.parse(start, n_rows)
    for it in range(iterations + 1):
        a, b = handler.grid(state)
        q = _feedback_codes(rows, U, a, b, handler, perm, block_size)
        tag = "gptq" if it == 0 else f"refit{it}+gptq"
        candidates[tag] = handler.pack(state, q)
        if it == iterations:
            break
        state = _refit(handler, state, rows, H, q, damp)
        candidates[f"refit{it + 1}"] = handler.pack(state, q)  # re-fitted scales with these codes, as they are

    errors = {key: row_errors(rows, raw, name, H) for key, raw in candidates.items()}
    keys = list(candidates)
    table = np.stack([errors[k] for k in keys])  # [candidates, rows]
    table = np.where(np.isfinite(table), table, np.inf)
    best = np.argmin(table, axis=0)  # ties keep the earlier candidate: the imatrix encoder's bytes first
    raw = np.empty_like(start)
    for k, key in enumerate(keys):
        raw[best == k] = candidates[key][best == k]
    chosen_err = table[best, np.arange(n_rows)]
    summary = {key: float(errors[key].mean()) for key in keys}
    summary["chosen"] = float(chosen_err.mean())
    return RefineResult(raw, summary, {key: int((best == k).sum()) for k, key in enumerate(keys)})


def feedback_codes(rows: np.ndarray, qtype: str, hessian: np.ndarray, raw: np.ndarray, act_order: bool = True,
                   block_size: int = 128, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 alone: the error-feedback levels for the scale fields already held in ``raw`` (bytes of ``qtype``
    for ``rows``, e.g. the imatrix encoder's), and those levels packed with the same fields.

    Returns (levels int32 ``[n_rows, n_per_row]`` — the stored code of every weight, e.g. 0..15 for Q4_0 and
    Q4_K, −127..127 for Q8_0 — and the bytes ``[n_rows, row_bytes]``)."""
    name = quants.type_name(qtype)
    if name not in _HANDLERS:
        raise ConfigError(f"{name} has no error-feedback path; supported: {', '.join(REFINED_TYPES)}")
    rows = np.ascontiguousarray(rows, dtype=_F32)
    H = np.asarray(hessian, dtype=np.float64)
    if rows.ndim != 2 or H.shape != (rows.shape[1], rows.shape[1]):
        raise DataError(f"need rows [n_rows, n] and a Hessian [n, n]; got {list(rows.shape)} and {list(H.shape)}")
    handler = _HANDLERS[name]
    perm = np.argsort(-np.diagonal(H), kind="stable") if act_order else None
    U = _inverse_factor(H if perm is None else H[np.ix_(perm, perm)], damp)
    if U is None:
        raise DataError("the Hessian did not factorize even with 10^4 x the damping")
    state = handler.parse(np.ascontiguousarray(raw).reshape(rows.shape[0], -1), rows.shape[0])
    a, b = handler.grid(state)
    q = _feedback_codes(rows, U, a, b, handler, perm, block_size)
    return q, handler.pack(state, q)


def row_errors(rows: np.ndarray, raw: np.ndarray, qtype: str, hessian: np.ndarray) -> np.ndarray:
    """Each row's output error ``(w − ŵ) H (w − ŵ)ᵀ`` (float64 ``[n_rows]``), ŵ decoded from the bytes ``raw``."""
    n = rows.shape[1]
    E = torch.from_numpy(np.asarray(rows, dtype=np.float64) - quants.dequantize(raw, qtype, n).astype(np.float64))
    H = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    return ((E @ H) * E).sum(dim=1).numpy()


def layer_error(rows: np.ndarray, raw: np.ndarray, qtype: str, hessian: np.ndarray) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: the squared output error the encoding adds, summed over rows."""
    return float(row_errors(rows, raw, qtype, hessian).sum())


# ------------------------------------------------------------------------------------------ the pieces


def _inverse_factor(H: np.ndarray, damp: float, retries: int = 4) -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (float32 torch), λ = damp · mean(diag H), raised x10 on
    failure. Inputs never seen in calibration (``H_jj = 0``) get ``H_jj = 1``: no feedback goes into or out of
    them, so they are rounded as the imatrix encoder's grid rounds them."""
    H = torch.from_numpy(np.array(H, dtype=np.float64))
    diag = H.diagonal()
    dead = diag == 0
    H[dead, dead] = 1.0
    mean = float(diag.abs().mean())
    unit = mean if math.isfinite(mean) and mean > 0 else 1.0
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    lam = damp if damp > 0 else 1e-6
    for _ in range(retries + 1):
        # One Cholesky of the reversed matrix gives H = R Rᵀ with R upper triangular; then H⁻¹ = R⁻ᵀ R⁻¹ and
        # R⁻¹ is the upper factor GPTQ needs (the same matrix as chol(inv(H)), upper), in two O(n³) steps.
        L, info = torch.linalg.cholesky_ex((H + lam * unit * eye).flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
            if torch.isfinite(U).all():
                return U.float()
        lam *= 10
    return None


def _feedback_codes(rows: np.ndarray, U: torch.Tensor, a: np.ndarray, b: np.ndarray, handler, perm, block_size: int
                    ) -> np.ndarray:
    """GPTQ's column loop on fixed per-group grids: int32 levels ``[n_rows, n]`` in the original column order."""
    group = handler.group
    W = torch.from_numpy(rows.copy())
    A = torch.from_numpy(np.repeat(a, group, axis=1))  # each column's grid for every row
    B = torch.from_numpy(np.repeat(b, group, axis=1))
    if perm is not None:
        p = torch.from_numpy(perm)
        W, A, B = W[:, p], A[:, p], B[:, p]
    flat = A == 0  # all-zero (sub-)blocks: every level decodes to b; keep the level the encoders use, the lowest
    A_safe = torch.where(flat, torch.ones_like(A), A)
    n = W.shape[1]
    Q = torch.empty_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]
            q = torch.round((w - B[:, j]) / A_safe[:, j]).clamp_(handler.qmin, handler.qmax)
            q = torch.where(flat[:, j], torch.full_like(q, max(handler.qmin, 0)), q)
            err = (w - (A[:, j] * q + B[:, j])) / U1[i, i]
            if i + 1 < i2 - i1:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
            E1[:, i] = err
            Q[:, j] = q
        if i2 < n:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        out = torch.empty_like(Q)
        out[:, torch.from_numpy(perm)] = Q
        Q = out
    return Q.numpy().astype(np.int32)


def _refit(handler, state: dict, rows: np.ndarray, H: np.ndarray, q: np.ndarray, damp: float) -> dict:
    """The scale fields that minimise ``(w − ŵ) H (w − ŵ)ᵀ`` per row for fixed levels ``q``.

    ŵ is linear in the row's group parameters: ``a_g`` multiplies the group's levels (less the zero for
    symmetric types) and ``b_g`` its indicator. The normal equations couple every pair of groups through the
    block of ``H`` between them; they are built blockwise (``O(rows · n²)``) and solved per row in float64,
    with a small ridge (``1e-6 ·`` the mean diagonal) for groups whose levels are constant. The continuous
    solution is then rounded to the type's fields; rows whose solve is not finite keep their old fields."""
    n_rows, n = rows.shape
    g = handler.group
    G = n // g
    Hd = torch.from_numpy(H.astype(np.float64))
    Hd = Hd + damp * float(np.abs(np.diagonal(H)).mean() or 1.0) * torch.eye(n, dtype=torch.float64)
    # The O(rows · n²) products run in float32 (sums of n terms: ~1e-6 relative, far below what rounding the
    # scales to fp16 / 6 bits costs); the small per-row systems are assembled and solved in float64.
    Hb = Hd.float().reshape(G, g, n)
    WH = torch.from_numpy(rows.astype(np.float64)) @ Hd  # [R, n]
    levels = torch.from_numpy(q.astype(np.float32))
    if handler.n_params == 1:
        levels = levels - handler.zero
    old_a, old_b = handler.grid(state)
    a_new = np.array(old_a, dtype=np.float64)
    b_new = np.array(old_b, dtype=np.float64)
    if handler.n_params == 2:
        Hvv = Hd.reshape(G, g, n).sum(dim=1).reshape(G, G, g).sum(dim=2)  # Σ_{i∈g, j∈h} H_ij, every row's
    step = max(1, (1 << 22) // (G * n))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        Lg = levels[r0:r1].reshape(-1, G, g)
        T = torch.einsum("rgi,gin->rgn", Lg, Hb).reshape(-1, G, G, g)  # Σ_{i∈g} l_i H_i,(h, j)
        Muu = (T * Lg[:, None, :, :]).sum(dim=3).double()
        ru = (Lg.double() * WH[r0:r1].reshape(-1, G, g)).sum(dim=2)
        if handler.n_params == 1:
            M, rhs = Muu, ru
        else:
            Muv = T.sum(dim=3).double()  # u_g against v_h
            top = torch.cat([Muu, Muv], dim=2)
            bottom = torch.cat([Muv.transpose(1, 2), Hvv.expand(r1 - r0, G, G)], dim=2)
            M = torch.cat([top, bottom], dim=1)
            rhs = torch.cat([ru, WH[r0:r1].reshape(-1, G, g).sum(dim=2)], dim=1)
        ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).abs().mean(dim=1).clamp_min(1e-30)
        M = M + ridge[:, None, None] * torch.eye(M.shape[1], dtype=M.dtype)
        sol, info = torch.linalg.solve_ex(M, rhs[..., None])
        sol = sol[..., 0]
        ok = (info == 0) & torch.isfinite(sol).all(dim=1)
        sol = sol.numpy()
        ok = ok.numpy()
        a_new[r0:r1][ok] = sol[ok, :G]
        if handler.n_params == 2:
            b_new[r0:r1][ok] = sol[ok, G:]
    return handler.from_ls(state, a_new.astype(_F32), b_new.astype(_F32) if handler.n_params == 2 else None)
