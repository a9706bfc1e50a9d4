"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize a weight column by column, feeding each column's
rounding error into the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear ``y = W x`` and calibration inputs ``X`` the layer-wise objective is ``||W X - Ŵ X||²``, whose
Hessian in each row of ``W`` is ``H = 2/n · Σ x xᵀ`` (``[in, in]``). Quantizing column ``i`` to ``q`` leaves an
error ``e = (w_i - q) / [H⁻¹]_ii``; the optimal correction of the remaining columns is ``-e · [H⁻¹]_{i, i+1:}``.
With ``U`` the upper Cholesky factor of ``H⁻¹`` the rows of ``U`` carry exactly these coefficients, so one
factorization serves every column (the paper's Cholesky reformulation). Corrections inside a block of
``block_size`` columns are applied eagerly, to the rest of the matrix once per block (lazy batch updates).

holdall's specifics:

* **Numerics.** ``H`` accumulates in float32 (a running sum of ``xᵀx`` over batches); damping and the factor
  ``U`` run in float64 (where an ill-conditioned ``H`` bites), the column loop in float32. ``U`` comes from one
  Cholesky of the reversed ``H`` and one triangular inverse, the same matrix as the reference's three-step
  ``chol(cholesky_inverse(chol(H)), upper)`` at about a third of the cost (``_try_inverse_factor``).
  A failed factorization raises the damping ``x10`` (``damp_retries`` times); if it never succeeds, or the
  updates stop being finite, that linear is rounded to nearest and the report says so. Weights are never NaN.
* **Dead inputs** (``H_ii == 0``: the channel is always 0 in the calibration data) get ``H_ii = 1`` and a zeroed
  weight column, as in the reference.
* **Groups.** Without act-order each group's scale/zero is fitted when the loop reaches the group, on the
  already-corrected weights (the reference's behaviour); blocks are aligned to groups so a group is always
  fitted on fully updated columns. A partial last group (576 = 4.5 x 128) is just a shorter slice.
* **act-order** (``desc_act``: columns in order of decreasing ``H_ii``) uses **static groups**: every group's
  parameters are fitted up front on the original weights, in the original column order, so the stored layout
  stays plain group-wise (``scale [out, ceil(in/g)]``, no ``g_idx``) and every holdall reader, kernel and export
  works unchanged. The reference's alternative (groups formed in permuted order) needs a ``g_idx``, which the core
  format does not store, so it is refused with that explanation.
* The codes use the core's conventions (``core/affine.py``: scales rounded to ``scale_dtype`` before the codes,
  symmetric zero ``2**(bits-1)``, round-half-to-even), so with a diagonal ``H`` GPTQ returns exactly the
  round-to-nearest codes, and the result is an ordinary ``QuantLinear``.
* **Codebook schemes** (nf4/fp4, ± double quant: the QLoRA base) run the same error feedback inside the
  bitsandbytes block format: block absmax fixed up front (static groups), each column coded by bitsandbytes'
  rule, optional least-squares re-fit of the block scales; see ``gptq_codebook.py``. The stored bytes have the
  RTN NF4 layout, so everything that reads NF4 reads them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import affine
from ..core.qtensor import QuantizedTensor
from ..core.scheme import QuantScheme
from ..errors import ConfigError, DataError
from .config import MethodOptions, MethodResult, MethodRun, QuantConfig, register_method
from .gram import add_gram
from .packed import quant_linear_from_codes
from .sequential import run_sequential


@dataclass(frozen=True)
class GPTQConfig(MethodOptions):
    """GPTQ's options (the scheme — bits, group size, symmetry — lives in ``QuantConfig.scheme``).

    damp_percent: damping added to ``H``'s diagonal, as a fraction of its mean (the reference's ``percdamp``).
    damp_retries: how many times the damping is multiplied by 10 when the Cholesky factorization fails.
    block_size: columns per lazy batch update (speed only; the result is the same up to float rounding).
    act_order: quantize columns in order of decreasing Hessian diagonal (``desc_act``); needs static groups.
    static_groups: fit every group's scale/zero up front on the original weights; None = same as act_order.
    true_sequential: collect each linear group's statistics after the earlier groups of the layer were quantized
        (q/k/v, then o, then gate/up, then down); False = all from the float layer in one pass.
    refit_scales: codebook schemes (nf4/fp4) only: after the error feedback, re-fit each block's scale by least
        squares for the chosen codes, choose the codes again against those scales and re-fit once more
        (``gptq_codebook.py``); the stored format is unchanged.
    range_choice: symmetric int schemes with group parameters fixed up front (static groups, per channel): run
        the column loop on two grids — the usual one (scale ``absmax / ((2^b - 1) / 2)``: levels -2^(b-1) ..
        2^(b-1) - 1, so a group's positive extreme is clipped by half a step) and one whose top level reaches the
        absmax (scale ``absmax / (2^(b-1) - 1)``: no clipping, coarser steps) — and keep, per output row, the
        result with the lower output error ``(w - ŵ) H (w - ŵ)ᵀ``. Rows are independent in GPTQ, so the choice
        is exact; the stored format is the same. Error feedback pushes values past a clipped extreme, which is
        why the unclipped grid often wins at 3 bits. None (default) = on for 2-3 bits, off from 4 bits: on
        SmolLM2 with static act-order it took w3g64 from KLD 1.126 to 0.587 (PPL 64.9 -> 37.7) but w4g64 from
        KLD 0.130 to 0.139 (the calibration objective improves, the test-text KLD does not).
    """

    damp_percent: float = 0.01
    damp_retries: int = 4
    block_size: int = 128
    act_order: bool = False
    static_groups: bool | None = None
    true_sequential: bool = True
    refit_scales: bool = False
    range_choice: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.damp_percent, (int, float)) or isinstance(self.damp_percent, bool) or not (
            0 <= self.damp_percent < 1e6
        ):
            raise ConfigError(f"GPTQConfig.damp_percent must be a number >= 0 (e.g. 0.01), got {self.damp_percent!r}")
        for name, minimum in (("damp_retries", 0), ("block_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"GPTQConfig.{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("act_order", "true_sequential", "refit_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTQConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.range_choice not in (None, True, False):
            raise ConfigError(f"GPTQConfig.range_choice must be True, False or None, got {self.range_choice!r}")
        static = self.act_order if self.static_groups is None else self.static_groups
        if not isinstance(static, bool):
            raise ConfigError(f"GPTQConfig.static_groups must be True, False or None, got {self.static_groups!r}")
        if self.act_order and not static:
            raise ConfigError(
                "GPTQ act_order with dynamic groups (static_groups=False) gives every column a group index (g_idx) "
                "that holdall's plain group-wise format does not store; use static_groups=True (the default with "
                "act_order): group parameters are fitted on the original column order, and quality is the same"
            )
        object.__setattr__(self, "static_groups", static)

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.is_codebook:  # nf4/fp4 (± double quant): block scales fixed up front, codes by error feedback
            return
        if self.refit_scales:
            raise ConfigError(
                "GPTQConfig.refit_scales applies to codebook schemes (nf4/fp4) only; int groups already get "
                "their scale fitted by GPTQ itself. Drop refit_scales or use an nf4/fp4 scheme"
            )
        if scheme.dtype != "int" or scheme.double_quant:
            raise ConfigError(
                f"GPTQ produces plain affine integers or nf4/fp4 codebook weights; {scheme.label} is not one (double "
                "quantization of int scales would change them after the codes were chosen against them). Use an int "
                "scheme without double_quant, or an nf4/fp4 scheme (double quant allowed there)"
            )


@dataclass
class GPTQResult:
    """One weight quantized by :func:`gptq_quantize`."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # [R, G] in scale_dtype
    zero: torch.Tensor | None  # uint8 [R, G], asymmetric only
    damp: float | None  # damping fraction that factorized H; None = fell back to round-to-nearest
    notes: list[str] = field(default_factory=list)


# --- the algorithm on one weight ------------------------------------------------------------------------
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    config: GPTQConfig,
    row_splits: list[int] | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``w [out, in]`` given the Hessian ``H [in, in]`` of its inputs (``2/n Σ x xᵀ``).

    Codebook schemes (nf4/fp4) go to :func:`~holdall.algorithms.gptq_codebook.gptq_codebook`: ``codes`` are then
    code indices and ``scale`` the raw float32 block scales ``[out, in / block]``; ``row_splits`` (codebook only)
    gives the row counts of stacked weights that are stored separately (their scales are double-quantized apart).
    """
    config.check_scheme(scheme)
    if scheme.is_codebook:
        from .gptq_codebook import gptq_codebook

        return gptq_codebook(w, hessian, scheme, config, row_splits)
    check_hessian(w, hessian)
    affine.check_finite(w)
    W = w.detach().float().clone()  # [out, in], corrected in place as columns are quantized
    H = hessian.detach().float().clone()  # [in, in]

    dead = H.diagonal() == 0  # inputs that were always 0: nothing to preserve, and H would be singular
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    fixed_params = scheme.granularity != "group" or config.static_groups
    scale, zero = affine.choose_qparams(W, scheme) if fixed_params else _empty_qparams(W, scheme)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if config.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    hinv, damp, notes = inverse_hessian_factor(H, config)
    if hinv is not None:
        codes = _quantize_columns(W, hinv, scale, zero, perm, scheme, config, fixed_params)
        wanted = scheme.bits <= 3 if config.range_choice is None else config.range_choice
        choose = wanted and fixed_params and scheme.symmetric and scheme.granularity != "tensor"
        if codes is not None and choose:
            wide = _unclipped_scales(scale, scheme)
            other = _quantize_columns(W, hinv, wide, None, perm, scheme, config, fixed_params)
            if other is not None:
                codes, scale = _per_row_better(w, hessian, dead, (codes, scale), (other, wide), scheme)
        if codes is not None:
            return GPTQResult(codes, scale, zero, damp, notes)
        notes.append("the error feedback stopped being finite (ill-conditioned Hessian)")
    # the safe answer: plain round-to-nearest of the (dead-column-zeroed) weight, in the original order
    W = w.detach().float().clone()
    W[:, dead] = 0.0
    scale, zero = affine.choose_qparams(W, scheme)
    notes.append("quantized with round-to-nearest instead of GPTQ")
    return GPTQResult(affine.quantize_affine(W, scale, zero, scheme), scale, zero, None, notes)


def check_hessian(w: torch.Tensor, hessian: torch.Tensor) -> None:
    """``hessian`` must be ``[in, in]`` for ``w [out, in]`` and finite."""
    n_cols = w.shape[1]
    if tuple(hessian.shape) != (n_cols, n_cols):
        raise ConfigError(
            f"the Hessian is {tuple(hessian.shape)}, expected [{n_cols}, {n_cols}] for a weight {tuple(w.shape)}"
        )
    if not torch.isfinite(hessian).all():
        raise DataError("the Hessian holds NaN/Inf: the calibration activations overflow float32")


def _unclipped_scales(scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Symmetric scales whose top level ``2^(b-1) - 1`` reaches the group's absmax (``scale`` reaches it at
    ``(2^b - 1) / 2`` levels, clipping the positive extreme)."""
    maxq = 2**scheme.bits - 1
    wide = scale.float() * ((maxq / 2) / (2 ** (scheme.bits - 1) - 1))
    return wide.to(scale.dtype)


def _per_row_better(w: torch.Tensor, hessian: torch.Tensor, dead: torch.Tensor, first, second, scheme: QuantScheme):
    """Per output row, the (codes, scale) candidate with the lower ``(w - ŵ) H (w - ŵ)ᵀ`` (ties: the first)."""
    W = w.detach().float().clone()
    W[:, dead] = 0.0
    H = hessian.detach().float()

    def row_errors(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        E = W - affine.dequantize_affine(codes, scale, None, scheme)
        return ((E @ H) * E).sum(dim=1)  # [out]

    (c1, s1), (c2, s2) = first, second
    take = row_errors(c2, s2) < row_errors(c1, s1)  # [out]
    codes = torch.where(take[:, None], c2, c1)
    scale = torch.where(take[:, None], s2, s1)
    return codes, scale


def inverse_hessian_factor(H: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor | None, float | None, list[str]]:
    """``(U, damp, notes)``: ``U`` the upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹`` (float32).

    On failure the damping is multiplied by 10, up to ``config.damp_retries`` times; ``U`` is None if every try
    failed. Works in float64: the inverse of a nearly singular float32 Hessian is where precision runs out.
    """
    H64 = H.double()
    # |diag|: a Hessian from real data has a non-negative diagonal (then this is the reference's mean(diag));
    # a broken one may not, and must still get a damping of its own scale
    mean_diag = float(H64.diagonal().abs().mean())
    unit = mean_diag if math.isfinite(mean_diag) and mean_diag > 0 else 1.0
    eye = torch.eye(H64.shape[0], dtype=H64.dtype, device=H64.device)
    damp = config.damp_percent
    tried = []
    for _ in range(config.damp_retries + 1):
        U = _try_inverse_factor(H64 + (damp * unit) * eye)
        if U is not None:
            notes = []
            if tried:
                notes.append(
                    f"Hessian not positive definite with damping {', '.join(f'{d:g}' for d in tried)}; "
                    f"factorized with damping {damp:g} (x mean diagonal)"
                )
            return U.float(), damp, notes
        tried.append(damp)
        damp = damp * 10 if damp > 0 else 0.01
    return None, None, [f"Cholesky failed with every damping tried ({', '.join(f'{d:g}' for d in tried)})"]


def _try_inverse_factor(H: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), or None if ``H`` is not positive definite.

    The reference computes ``chol(cholesky_inverse(chol(H)), upper)``: three O(n³) steps. One Cholesky of the
    *reversed* matrix does it in two: with ``J`` the reversal permutation, ``J H J = L Lᵀ`` gives
    ``H = R Rᵀ`` for the upper-triangular ``R = J L J``, so ``H⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹`` (upper triangular,
    positive diagonal: the Cholesky factor is unique, so this is the same ``U``).
    """
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return None
    R = L.flip(0, 1)  # upper triangular, H = R Rᵀ
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.solve_triangular(R, eye, upper=True)
    if not torch.isfinite(U).all():
        return None
    return U


def _empty_qparams(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero grids to be filled group by group as the column loop reaches them."""
    rows, groups = affine.qparams_shape(W.shape, scheme)
    scale = torch.empty(rows, groups, dtype=scheme.torch_scale_dtype, device=W.device)
    zero = None if scheme.symmetric else torch.zeros(rows, groups, dtype=torch.uint8, device=W.device)
    return scale, zero


def _quantize_columns(
    W: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    perm: torch.Tensor | None,
    scheme: QuantScheme,
    config: GPTQConfig,
    fixed_params: bool,
) -> torch.Tensor | None:
    """The column loop on ``W [out, in]`` (already permuted); fills ``scale``/``zero`` for dynamic groups.

    Returns uint8 codes ``[out, in]`` in the original column order, or None if the updates became non-finite.
    The loop is bound by per-op overhead (~10 small ops per column), so it works on ``Wᵀ``: a column of ``W``
    is then a contiguous row. On a CPU each step is a handful of in-place torch ops (:func:`_blocks_torch`); on
    a GPU with Triton one kernel launch walks up to 128 columns (:func:`_blocks_triton`).
    """
    n_cols = W.shape[1]
    g = scheme.group_size if scheme.granularity == "group" else n_cols
    order = perm.tolist() if perm is not None else range(n_cols)
    group_of = torch.tensor([c // g for c in order], device=W.device)  # scale column of each loop position
    # dynamic groups are fitted at their first column from the block's up-to-date copy: blocks must hold whole groups
    block = config.block_size if fixed_params else g * max(1, config.block_size // g)
    Wt = W.t().contiguous()  # [in, out]
    if _use_triton(Wt):
        codes_t = _blocks_triton(Wt, hinv, scale, zero, group_of, scheme, block, g, fixed_params)
    else:
        codes_t = _blocks_torch(Wt, hinv, scale, zero, group_of, scheme, block, g, fixed_params)
    if codes_t is None:
        return None
    codes = codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous()


def _blocks_torch(
    Wt: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_of: torch.Tensor,
    scheme: QuantScheme,
    block: int,
    g: int,
    fixed_params: bool,
) -> torch.Tensor | None:
    """The lazy-block loop with one handful of tensor ops per column (CPU, or a GPU without Triton).

    ``Wt [in, out]`` is corrected in place; returns the codes ``[in, out]`` in loop order, or None on non-finite
    updates. On a CPU the per-op cost is small, so this is also the fast path there.
    """
    n_cols = Wt.shape[0]
    maxq = 2**scheme.bits - 1
    midpoint = float(2 ** (scheme.bits - 1))
    fit_scheme = dataclasses.replace(scheme, granularity="channel")
    codes_t = torch.empty(n_cols, Wt.shape[1], dtype=torch.uint8, device=Wt.device)
    for i1 in range(0, n_cols, block):
        i2 = min(i1 + block, n_cols)
        W1 = Wt[i1:i2].clone()  # [b, out]: this block's columns, corrected eagerly
        Q1 = torch.empty_like(W1)  # codes as floats
        Err1 = torch.empty_like(W1)  # scaled errors, fed to the rest of W once per block
        Hinv1 = hinv[i1:i2, i1:i2]
        inv_diag = (1.0 / Hinv1.diagonal()).tolist()
        if fixed_params:
            S1, Z1 = _block_params(scale, zero, group_of[i1:i2])  # [b, out] (or [b, 1] per tensor)
        else:
            S1 = torch.empty_like(W1)
            Z1 = torch.empty_like(W1) if zero is not None else None
        for i in range(i2 - i1):
            j = i1 + i
            if not fixed_params and j % g == 0:
                fit = W1[i : i + g]  # [<=g, out]: the whole group, already corrected up to here
                if not torch.isfinite(fit).all():
                    return None
                s_fit, z_fit = affine.choose_qparams(fit.t(), fit_scheme)  # [out, 1] each
                scale[:, j // g] = s_fit[:, 0]
                S1[i : i + g] = s_fit[:, 0].float()
                if zero is not None:
                    zero[:, j // g] = z_fit[:, 0]
                    Z1[i : i + g] = z_fit[:, 0].float()
            w, s = W1[i], S1[i]  # [out]
            z = Z1[i] if Z1 is not None else midpoint
            q = torch.div(w, s).round_().add_(z).clamp_(0, maxq)  # the core's rounding: diagonal H == RTN exactly
            Q1[i] = q
            err = torch.sub(q, z).mul_(s).neg_().add_(w).mul_(inv_diag[i])  # (w - (q - z) s) / [H⁻¹ factor]_ii
            Err1[i] = err
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # feed the error to the block's remaining columns
        if not torch.isfinite(Err1).all():
            return None
        codes_t[i1:i2] = Q1.to(torch.uint8)
        Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy update of everything after the block
    return codes_t


# --- the column loop as one GPU kernel per block ----------------------------------------------------------
# On a GPU the torch loop above is bound by kernel launches: ~12 launches of a few microseconds per column,
# ~23k columns per 7B decoder layer, 3.6 s of a 7.5 s layer (H200). GPTQ treats output rows independently, so
# one Triton program can own a tile of rows and walk a whole segment of columns with the tile in registers: the
# segment costs one launch instead of ~1500. The arithmetic per column is the torch loop's, in the same order
# (IEEE division, round-half-to-even), so codes agree with the CPU's up to float rounding of the updates.
_TRITON_SEGMENT = 128  # columns one kernel launch walks: the register tile is [128, rows per program]
_triton_kernel = None  # compiled lazily: importing triton costs time, and CPU machines need not have it


def _use_triton(Wt: torch.Tensor) -> bool:
    """True when the per-block kernel can run: a CUDA tensor and an importable Triton (HOLDALL_KERNELS=0 disables)."""
    if Wt.device.type != "cuda" or os.environ.get("HOLDALL_KERNELS", "1").strip() == "0":
        return False
    return _load_triton_kernel() is not None


def _load_triton_kernel():
    global _triton_kernel, triton, tl, libdevice
    if _triton_kernel is not None:
        return _triton_kernel or None
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        _triton_kernel = False  # remembered: the torch loop serves
        return None

    @triton.jit
    def gptq_segment_kernel(
        W, stride_w, H, stride_h, S, stride_s, Z, INV, Q, stride_q, E, stride_e, R, L, maxq, midpoint,
        HAS_ZERO: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # W [L, R] columns x rows of the (transposed) weight, corrected eagerly in registers; H [L, L] the segment's
        # block of the inverse-Hessian factor; S/Z [L, R] per-position scale/zero; INV [L] 1 / H_ii.
        # Writes the codes Q [L, R] (uint8) and the scaled errors E [L, R] that update the rest of the weight.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_L)
        rmask = rows < R
        cmask = cols < L
        w = tl.load(W + cols[:, None] * stride_w + rows[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        for i in tl.range(0, L):
            # a register tile cannot be indexed by a loop variable: pick column i out with a masked sum
            wi = tl.sum(tl.where(cols[:, None] == i, w, 0.0), axis=0)  # [BLOCK_R]
            s = tl.load(S + i * stride_s + rows, mask=rmask, other=1.0)
            if HAS_ZERO:
                z = tl.load(Z + i * stride_s + rows, mask=rmask, other=0.0)
            else:
                z = midpoint
            # div_rn: IEEE division as torch's (Triton's default '/' is approximate); rint rounds half to even
            q = libdevice.rint(tl.math.div_rn(wi, s)) + z
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            err = (wi - (q - z) * s) * tl.load(INV + i)
            tl.store(Q + i * stride_q + rows, q.to(tl.uint8), mask=rmask)
            tl.store(E + i * stride_e + rows, err, mask=rmask)
            # feed the error to the segment's later columns (column i itself is done)
            h = tl.load(H + i * stride_h + cols, mask=cmask & (cols > i), other=0.0)  # [BLOCK_L]
            w = w - h[:, None] * err[None, :]

    _triton_kernel = gptq_segment_kernel
    return _triton_kernel


def _blocks_triton(
    Wt: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_of: torch.Tensor,
    scheme: QuantScheme,
    block: int,
    g: int,
    fixed_params: bool,
) -> torch.Tensor | None:
    """:func:`_blocks_torch` with each block's column loop done by :func:`_load_triton_kernel`'s kernel.

    A block is walked in segments of at most ``_TRITON_SEGMENT`` columns that never straddle a group start
    (dynamic groups are fitted, with the core's ``choose_qparams``, on the block's up-to-date columns when a
    segment opens a group); after each segment the block's later columns get its errors in one matmul, which is
    the same correction the eager loop applies column by column.
    """
    kernel = _load_triton_kernel()
    n_cols, n_rows = Wt.shape
    maxq = float(2**scheme.bits - 1)
    midpoint = float(2 ** (scheme.bits - 1))
    fit_scheme = dataclasses.replace(scheme, granularity="channel")
    block_r = 32 if n_rows <= 8192 else 64  # enough programs to fill the SMs at 4096 rows
    grid = (triton.cdiv(n_rows, block_r),)
    hinv = hinv.contiguous()
    inv_diag = 1.0 / hinv.diagonal()
    codes_t = torch.empty(n_cols, n_rows, dtype=torch.uint8, device=Wt.device)
    for i1 in range(0, n_cols, block):
        i2 = min(i1 + block, n_cols)
        W1 = Wt[i1:i2].clone()  # [b, out]
        Err1 = torch.empty_like(W1)
        if fixed_params:
            S1, Z1 = _block_params(scale, zero, group_of[i1:i2])
            S1 = S1.expand(i2 - i1, n_rows).contiguous()  # a per-tensor scale is one column: give every row one
            Z1 = Z1.expand(i2 - i1, n_rows).contiguous() if Z1 is not None else None
        s1 = i1
        while s1 < i2:
            s2 = min(s1 + _TRITON_SEGMENT, i2)
            if not fixed_params:
                s2 = min(s2, (s1 // g + 1) * g)
            a, b = s1 - i1, s2 - i1
            if fixed_params:
                S, Z = S1[a:b], Z1[a:b] if Z1 is not None else None
            else:
                if s1 % g == 0:
                    fit = W1[a : a + g]  # the whole group, corrected up to its first column
                    if not torch.isfinite(fit).all():
                        return None
                    s_fit, z_fit = affine.choose_qparams(fit.t(), fit_scheme)  # [out, 1] each
                    scale[:, s1 // g] = s_fit[:, 0]
                    if zero is not None:
                        zero[:, s1 // g] = z_fit[:, 0]
                S = scale[:, s1 // g].float()[None].expand(b - a, n_rows).contiguous()
                Z = zero[:, s1 // g].float()[None].expand(b - a, n_rows).contiguous() if zero is not None else None
            seg_h = hinv[s1:s2, s1:s2]
            kernel[grid](
                W1[a:b], W1.stride(0), seg_h, hinv.stride(0), S, S.stride(0), Z if Z is not None else S,
                inv_diag[s1:s2], codes_t[s1:s2], codes_t.stride(0), Err1[a:b], Err1.stride(0), n_rows, s2 - s1,
                maxq, midpoint, HAS_ZERO=Z is not None, BLOCK_L=triton.next_power_of_2(s2 - s1),
                BLOCK_R=block_r, num_warps=4,
            )
            if s2 < i2:  # the segment's errors reach the block's later columns
                W1[b:].addmm_(hinv[s1:s2, s2:i2].t(), Err1[a:b], alpha=-1)
            s1 = s2
        if not torch.isfinite(Err1).all():
            return None
        Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy update of everything after the block
    return codes_t


def _block_params(
    scale: torch.Tensor, zero: torch.Tensor | None, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each loop position's scale (and zero) as float rows ``[b, R]``, gathered from ``[R, G]`` grids."""
    S1 = scale.t().float()[groups]
    Z1 = zero.t().float()[groups] if zero is not None else None
    return S1, Z1


# --- the engine's side ----------------------------------------------------------------------------------
class HessianObserver:
    """Accumulates ``Σ x xᵀ`` (float32) over the calibration tokens of one linear group's input.

    The sum is float32 whatever the activations' dtype. For bfloat16/float16 activations on a GPU the product is
    taken on the tensor cores with the half-precision inputs as they are and float32 accumulation and output
    (``gram.add_gram``): exact products, so this is the float32 ``xᵀx`` of the upcast inputs up to summation
    order, at the tensor cores' rate: 1.7 s -> 0.16 s of a 7B-width layer on an H200.
    """

    def __init__(self, names: list[str], in_features: int, device: torch.device):
        self.names = names
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        # x: [tokens, in]
        add_gram(self.sum, x)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2/n · Σ x xᵀ`` ``[in, in]``."""
        H = self.sum * (2.0 / max(self.n_tokens, 1))
        if not torch.isfinite(H).all():
            raise DataError(
                f"the input statistics of {', '.join(self.names)} overflow float32 (activations too large); "
                "the model's activations are broken or need a wider dtype"
            )
        return H


class GPTQQuantizer:
    """GPTQ as a :class:`~holdall.algorithms.sequential.LayerQuantizer`."""

    def __init__(self, scheme: QuantScheme, options: GPTQConfig, label: str):
        self.scheme = scheme
        self.options = options
        self.label = label

    def observer(self, names: list[str], linears: list[nn.Linear]) -> HessianObserver:
        weight = linears[0].weight
        return HessianObserver(names, weight.shape[1], weight.device)

    def quantize(
        self, names: list[str], linears: list[nn.Linear], observer: HessianObserver
    ) -> list[tuple[nn.Module, dict[str, Any]]]:
        """GPTQ on the group's weights stacked along the output dim: they share the input, hence ``H``, and GPTQ
        treats rows independently, so one column loop (and one factorization) serves q, k and v together.
        A per-tensor scale is the exception: each weight keeps its own."""
        H = observer.hessian()
        if self.scheme.granularity == "tensor":
            return [self._quantize([linear], H)[0] for linear in linears]
        return self._quantize(linears, H)

    def _quantize(self, linears: list[nn.Linear], H: torch.Tensor) -> list[tuple[nn.Module, dict[str, Any]]]:
        stacked = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
        rows = [linear.out_features for linear in linears]
        splits = rows if self.scheme.is_codebook else None
        result = gptq_quantize(stacked, H, self.scheme, self.options, splits)
        codes, scales = result.codes.split(rows), result.scale.split(rows)
        zeros = result.zero.split(rows) if result.zero is not None else [None] * len(rows)
        out = []
        for linear, c, s, z in zip(linears, codes, scales, zeros):
            c, s, z = c.contiguous(), s.contiguous(), None if z is None else z.contiguous()
            module = quant_linear_from_codes(linear, c, s, z, self.scheme)
            if self.scheme.is_codebook:
                quantized = module.dequantize_weight(torch.float32)
            else:
                quantized = affine.dequantize_affine(c, s, z, self.scheme)
            rtn = QuantizedTensor.from_float(linear.weight.detach(), self.scheme).dequantize()
            info = {
                "rel_error": output_error(linear.weight, quantized, H),
                "rtn_rel_error": output_error(linear.weight, rtn, H),
                "damp": result.damp,
                "notes": list(result.notes),
            }
            if getattr(result, "candidate_errors", None):  # codebook: the group's H-norm error per candidate
                info["group_candidate_errors"] = result.candidate_errors
            out.append((module, info))
        return out


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W - Ŵ) X|| / ||W X||`` on the calibration inputs, from their Hessian:
    ``sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ))`` with ``Δ = W - Ŵ``."""
    w = w.detach().float()
    delta = w - w_hat.float()
    err = float(((delta @ H) * delta).sum())
    ref = float(((w @ H) * w).sum())
    return math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0


def quantize_gptq(model: nn.Module, names: list[str], config: QuantConfig, run: MethodRun) -> MethodResult:
    """The ``gptq`` method: the sequential engine with :class:`GPTQQuantizer`."""
    options: GPTQConfig = config.options  # type: ignore[assignment]  (QuantConfig resolved it)
    calibration = config.calibration
    if run.calibration_ids is None or calibration is None:
        raise ConfigError("gptq needs calibration data; call it through holdall.quantize(model, config, tokenizer=...)")
    label = config.label + ("+act_order" if options.act_order else "") + ("+refit" if options.refit_scales else "")
    result = run_sequential(
        model,
        names,
        GPTQQuantizer(config.scheme, options, label),
        run.calibration_ids,
        true_sequential=options.true_sequential,
        batch_size=calibration.batch_size,
        device=calibration.device,
        progress=run.progress,
    )
    return MethodResult({name: config.scheme for name in names}, result.report.to_dict())


register_method(
    "gptq",
    quantize_gptq,
    ("int", "nf4", "fp4"),
    QuantScheme(),
    help="GPTQ: Hessian-aware error feedback on calibration data (default int4, groups of 128, 128x2048 tokens; "
    "nf4/fp4 ± double quant: codes chosen by error feedback inside the bitsandbytes block format)",
    options=GPTQConfig,
    calibration=(128, 2048),
)
