"""GPTQ into a 4-bit codebook format (NF4 / FP4, optionally double-quantized): a data-aware QLoRA base.

The storage is exactly the core's (``core/codebook.py``, bitsandbytes-compatible): one float32 absmax per block of
``block`` consecutive elements of the flattened weight, 4-bit codes into the NF4/FP4 table, and with double
quantization the absmax values 8-bit coded (blocks of 256, mean offset). Only the *choice* of the codes (and,
optionally, of each block's scale) changes, so the result dequantizes with the same function, trains through the
same ``DequantLinearFunction`` and loads in bitsandbytes as an RTN NF4 weight would.

How the codes are chosen (GPTQ with static groups, see ``gptq.py`` for the error-feedback derivation):

* ``in_features`` must be a multiple of the block size, so every block lies inside one row, along the input dim
  (the layout GPTQ's column loop needs: a column's elements each belong to one block of their row).
* Each block's absmax is taken up front from the (dead-column-zeroed) weight: the block scales are fixed before
  any code is chosen, like GPTQ's static groups, so act-order is allowed.
* Columns are visited one at a time (in order, or by decreasing ``H_ii`` with act-order). Column ``j``'s corrected
  values are coded exactly as bitsandbytes codes a value: multiplied by the float32 reciprocal of the block's
  absmax, clamped to [-1, 1], nearest table entry with ties to the smaller value. The reconstruction error uses the
  value the stored data decodes to (``table[code] * scale``, with the double-quantized scale when the scheme has
  double quantization) and is pushed into the later columns through the upper Cholesky factor of ``H⁻¹``.
  With a diagonal ``H`` nothing is pushed, and the codes are exactly round-to-nearest's.
* ``refit_scales``: with the codes fixed, each row's block scales are re-fitted by least squares in the ``H``
  norm (a ``blocks x blocks`` system per row), the codes chosen again by error feedback against those scales and
  the scales re-fitted once more; double quantization is applied to the fitted scales.
* Per row, the candidate (RTN, GPTQ, GPTQ + refit) with the lowest ``(w - ŵ) H (w - ŵ)ᵀ`` on the stored,
  decoded weights is kept, so no row — hence no linear — is worse than round-to-nearest on the calibration
  inputs (the scales are double-quantized as a whole, so the mixture is checked against the pure candidates too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import codebook as cb
from ..core.codebooks import codebook as codebook_table
from ..core.scheme import QuantScheme
from ..errors import ConfigError, DataError


@dataclass
class CodebookCandidate:
    """Codes ``uint8 [out, in]`` and the raw (not yet double-quantized) block scales ``float32 [out, blocks]``."""

    name: str
    codes: torch.Tensor
    scales: torch.Tensor


def check_codebook_shape(shape: tuple[int, int], scheme: QuantScheme) -> None:
    """GPTQ needs whole blocks inside each row: ``in_features % block == 0``."""
    out_features, in_features = shape
    if in_features % scheme.group_size:
        raise ConfigError(
            f"GPTQ into {scheme.label} needs every block of {scheme.group_size} elements inside one row, but the rows "
            f"have {in_features} elements ({in_features} % {scheme.group_size} != 0), so blocks straddle rows; use a "
            f"block size that divides {in_features}, or quantize this layer with plain nf4/fp4 (exclude it)"
        )


def stored_scales(
    scales: torch.Tensor, scheme: QuantScheme, row_splits: list[int] | None = None
) -> torch.Tensor:
    """The float32 scales the stored data decodes to: the double-quantized round trip, or the scales as they are.

    row_splits: rows of each separately stored weight when several are stacked (q/k/v): each weight's scales are
    double-quantized on their own (their own mean offset and 256-blocks), as each ``QuantLinear`` stores them.
    """
    if not scheme.double_quant:
        return scales.float()
    parts = scales.float().split(row_splits) if row_splits else [scales.float()]
    return torch.cat([cb.double_dequantize(*cb.double_quantize(p.reshape(-1))).reshape(p.shape) for p in parts])


def decode(
    codes: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme, row_splits: list[int] | None = None
) -> torch.Tensor:
    """``table[codes] * stored scale`` as float32 ``[out, in]`` (what ``dequantize_4bit`` returns for these data)."""
    table = codebook_table(scheme.dtype, codes.device)
    out_features, in_features = codes.shape
    s = stored_scales(scales, scheme, row_splits)  # [out, blocks]
    values = table[codes.long()].reshape(out_features, -1, scheme.group_size)
    return (values * s[:, :, None]).reshape(out_features, in_features)


def rtn_candidate(w: torch.Tensor, scheme: QuantScheme) -> CodebookCandidate:
    """Round-to-nearest, bit-exact with ``core.codebook.quantize_4bit`` (and bitsandbytes)."""
    out_features, in_features = w.shape
    packed, absmax = cb.quantize_4bit(w, scheme.dtype, scheme.group_size)
    from ..core.packing import unpack

    codes = unpack(packed.reshape(-1), 4, w.numel()).reshape(out_features, in_features)
    return CodebookCandidate("rtn", codes, absmax.reshape(out_features, -1))


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(w_r - ŵ_r) H (w_r - ŵ_r)ᵀ`` per row, float64 ``[out]``."""
    delta = (w.float() - w_hat.float()).double()
    return ((delta @ H.double()) * delta).sum(dim=1)


def feedback_codes(
    W: torch.Tensor,
    hinv: torch.Tensor,
    select_scale: torch.Tensor,
    value_scale: torch.Tensor,
    perm: torch.Tensor | None,
    scheme: QuantScheme,
    block_size: int,
) -> torch.Tensor | None:
    """GPTQ's column loop with fixed block scales; ``W [out, in]`` already permuted, ``hinv`` its factor.

    select_scale: ``[out, blocks]`` scales the codes are chosen against (bitsandbytes' arithmetic: multiply by the
        float32 reciprocal of ``max(scale, 1e-38)``, clamp, nearest entry); value_scale: ``[out, blocks]`` the
        scales the stored data decodes to (the error fed forward is measured against those).
    Returns uint8 codes ``[out, in]`` in the original column order, or None when the updates stop being finite.
    """
    n_cols = W.shape[1]
    g = scheme.group_size
    table = codebook_table(scheme.dtype, W.device)
    values, order = torch.sort(table, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    order_u8 = order.to(torch.uint8)
    loop_cols = perm if perm is not None else torch.arange(n_cols, device=W.device)
    group_of = loop_cols // g  # block (scale column) of each loop position
    inv_t = (1.0 / select_scale.float().clamp(min=cb.ABSMAX_FLOOR)).t()[group_of]  # [in, out] in loop order
    val_t = value_scale.float().t()[group_of]  # [in, out]
    Wt = W.t().contiguous()  # [in, out]: a column of W is a contiguous row here
    codes_t = torch.empty(n_cols, W.shape[0], dtype=torch.uint8, device=W.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        inv_diag = (1.0 / Hinv1.diagonal()).tolist()
        for i in range(i2 - i1):
            w = W1[i]
            position = torch.bucketize((w * inv_t[i1 + i]).clamp_(-1.0, 1.0), midpoints)
            codes_t[i1 + i] = order_u8[position]
            q = values[position].mul_(val_t[i1 + i])
            err = torch.sub(w, q).mul_(inv_diag[i])
            Err1[i] = err
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        if not torch.isfinite(Err1).all():
            return None
        Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous()


def refit_scales(w: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Least-squares block scales for fixed codes, float32 ``[out, blocks]``: per row ``argmin (w - C s) H (w - C s)ᵀ``.

    ``C`` holds the row's code values, one column per block (zero outside it); the ``blocks x blocks`` normal
    equations ``(Cᵀ H C) s = Cᵀ H w`` are solved for all rows at once in float64, with a tiny ridge. Negative
    solutions (a block whose codes fit the weight's negation: never seen in practice) are clamped to 0.
    """
    out_features, in_features = w.shape
    g = scheme.group_size
    nb = in_features // g
    table = codebook_table(scheme.dtype, w.device).double()
    C = table[codes.long()].reshape(out_features, nb, g)  # [r, b, i]
    H64 = H.double().reshape(nb, g, nb, g)  # [b, i, c, j]
    A = torch.einsum("rbi,bicj,rcj->rbc", C, H64, C)  # [r, b, c]
    wH = (w.double() @ H.double()).reshape(out_features, nb, g)  # [r, b, i]
    rhs = (C * wH).sum(-1)  # [r, b]
    ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).abs().mean(-1).clamp(min=1e-30)  # [r]
    eye = torch.eye(nb, dtype=A.dtype, device=A.device)
    s, info = torch.linalg.solve_ex(A + ridge[:, None, None] * eye, rhs)
    s = torch.where(torch.isfinite(s) & (info == 0)[:, None], s, torch.zeros_like(s))
    return s.clamp(min=0).float()


def choose_rows(
    w: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    candidates: list[CodebookCandidate],
    row_splits: list[int] | None = None,
) -> tuple[CodebookCandidate, dict[str, float]]:
    """Per row the candidate with the lowest H-norm error on its stored weights; the mixture, or the best pure
    candidate when double quantization of the mixed scales made it worse. Returns it and each total error."""
    errors = torch.stack([row_errors(w, decode(c.codes, c.scales, scheme, row_splits), H) for c in candidates])
    totals = {c.name: float(e.sum()) for c, e in zip(candidates, errors)}
    best = errors.argmin(dim=0)  # [out]
    codes = torch.stack([c.codes for c in candidates])[best, torch.arange(w.shape[0], device=w.device)]
    scales = torch.stack([c.scales for c in candidates])[best, torch.arange(w.shape[0], device=w.device)]
    mixed = CodebookCandidate("mixed", codes, scales)
    totals["mixed"] = float(row_errors(w, decode(codes, scales, scheme, row_splits), H).sum())
    pure = min(candidates, key=lambda c: totals[c.name])
    return (mixed if totals["mixed"] <= totals[pure.name] else pure), totals


def gptq_codebook(
    w: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, config, row_splits: list[int] | None = None
) -> "GPTQResult":  # noqa: F821
    """GPTQ-quantize ``w [out, in]`` into ``scheme`` (nf4/fp4, ± double quant) given its input Hessian ``[in, in]``.

    row_splits: when ``w`` stacks several weights that share the input (q/k/v), their row counts: each is stored
    (double-quantized) on its own, and the decoded values the error feedback uses follow that.

    Returns a ``GPTQResult`` whose ``codes`` are uint8 ``[out, in]`` code indices and ``scale`` the raw float32
    block scales ``[out, in / block]`` (to be double-quantized when stored, as ``QuantizedTensor`` does).
    """
    from .gptq import GPTQResult, check_hessian, inverse_hessian_factor

    if not scheme.is_codebook:
        raise ConfigError(f"gptq_codebook quantizes into nf4/fp4 schemes, got {scheme.label}")
    check_codebook_shape(tuple(w.shape), scheme)
    check_hessian(w, hessian)
    if not torch.isfinite(w).all():
        raise DataError("the weight holds NaN/Inf; it cannot be quantized")
    if row_splits is not None and sum(row_splits) != w.shape[0]:
        raise ConfigError(f"row_splits {row_splits} do not add up to the weight's {w.shape[0]} rows")
    w = w.detach().float()
    H_true = hessian.detach().float()  # the objective: dead inputs (always 0) cost nothing
    H = H_true.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W0 = w.clone()
    W0[:, dead] = 0.0

    rtn = rtn_candidate(w, scheme)  # of the weight as it is: the baseline every row must at least match
    candidates = [rtn]
    notes: list[str] = []
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if config.act_order else None
    Hp = H[perm][:, perm] if perm is not None else H
    hinv, damp, factor_notes = inverse_hessian_factor(Hp, config)
    notes += factor_notes
    if hinv is not None:
        absmax = W0.reshape(w.shape[0], -1, scheme.group_size).abs().amax(-1)  # [out, blocks]: static groups
        codes = _run(W0, hinv, absmax, perm, scheme, config, row_splits)
        if codes is not None:
            candidates.append(CodebookCandidate("gptq", codes, absmax))
            if config.refit_scales:
                fitted = refit_scales(w, codes, H_true, scheme)
                candidates.append(CodebookCandidate("gptq+refit", codes, fitted))
                again = _run(W0, hinv, fitted, perm, scheme, config, row_splits)
                if again is not None:
                    candidates.append(
                        CodebookCandidate("gptq+refit x2", again, refit_scales(w, again, H_true, scheme))
                    )
        else:
            notes.append("the error feedback stopped being finite (ill-conditioned Hessian)")
    if len(candidates) == 1:
        notes.append("quantized with round-to-nearest instead of GPTQ")
        damp = None
    chosen, totals = choose_rows(w, H_true, scheme, candidates, row_splits)
    if chosen.name == "rtn" and len(candidates) > 1:
        notes.append("round-to-nearest had the lower output error on the calibration inputs; kept it")
    result = GPTQResult(chosen.codes, chosen.scales, None, damp, notes)
    result.candidate_errors = totals  # type: ignore[attr-defined]  (reported per linear)
    return result


def _run(W0, hinv, scales, perm, scheme, config, row_splits) -> torch.Tensor | None:
    W = W0[:, perm] if perm is not None else W0.clone()
    value_scales = stored_scales(scales, scheme, row_splits)
    return feedback_codes(W, hinv, scales, value_scales, perm, scheme, config.block_size)
