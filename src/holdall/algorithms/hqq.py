"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023, mobiusml/hqq): calibration-free, per group.

RTN takes a group's scale and zero straight from its min/max, so one outlier stretches the grid for everyone
else. HQQ instead fits the zero point (and here, optionally, the scale) to minimise a *sparsity-promoting* error
``||W - dequant(quant(W))||_p^p`` with ``p < 1``, which lets a few outliers sit off the grid (clamped) in exchange
for a finer fit of the bulk. Half-quadratic splitting introduces an auxiliary error ``W_e`` and alternates:

    q   = clamp(round(W / s + z), 0, maxq)                 codes for the current parameters
    W_e = shrink_p(W - (q - z) s ; beta)                   the part of the error the lp norm lets go (prox step)
    z   = mean_group(q - (W - W_e) / s)                    closed-form zero for what must be matched
    s   = <q - z, W - W_e> / <q - z, q - z>  (per group)   closed-form scale (optional; HQQ keeps s fixed)
    beta *= kappa

``shrink_p(x; beta) = sign(x) · relu(|x| - |x|^(p-1) / beta)`` is the generalized soft-thresholding operator.
Defaults are HQQ's: ``p = 0.7, beta = 10, kappa = 1.01``, 20 iterations.

holdall stores zeros as integers in ``[0, 2**bits)`` (the GPTQ/AWQ convention, and what packed kernels read),
while HQQ's own format keeps a float zero. So every iterate is projected onto what can be stored — zero rounded
to an integer, scale rounded to ``scale_dtype`` — before its codes are computed: the optimizer always looks at
the codes that would really be stored (on SmolLM2's weights this beats iterating in float and rounding at the
end: 3-bit asymmetric squared error 0.79x RTN's instead of 0.80x). Per group the iterate with the lowest squared
error is kept, the round-to-nearest start included, so HQQ never does worse than RTN on a group (in squared
error); it stops early once an iteration gains less than ``tol``. With a symmetric scheme the zero is fixed at
the midpoint and only the scale is optimized. Codes are finally computed by the core (``quantize_affine``) from
the kept parameters, so the result is an ordinary ``QuantLinear``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..core import affine
from ..core.scheme import QuantScheme
from ..errors import ConfigError
from .config import MethodOptions, MethodRun, QuantConfig, register_method, set_submodule
from .packed import quant_linear_from_codes


@dataclass(frozen=True)
class HQQConfig(MethodOptions):
    """HQQ's optimizer settings (the scheme — bits, group size — lives in ``QuantConfig.scheme``).

    lp_norm: the p of the lp error (``0 < p <= 1``; smaller = more tolerant of outliers left off the grid).
    beta: initial penalty weight of the half-quadratic split; kappa: its growth per iteration (> 1).
    iters: optimization steps per weight.
    optimize_scale: also refit each group's scale in closed form (HQQ itself keeps the min/max scale). Needed
        for symmetric schemes, whose zero point is fixed; with integer zeros it is also where most of the gain
        comes from (a zero-only update moves by less than half a step and rounds back).
    tol: stop early once an iteration lowers the weight's total squared error by less than this fraction.
    """

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = True
    tol: float = 1e-4

    def __post_init__(self) -> None:
        checks = (
            ("lp_norm", 0 < _num(self.lp_norm) <= 1, "in (0, 1], e.g. 0.7"),
            ("beta", _num(self.beta) > 0, "> 0, e.g. 10"),
            ("kappa", _num(self.kappa) >= 1, ">= 1, e.g. 1.01"),
        )
        for name, ok, hint in checks:
            if not ok:
                raise ConfigError(f"HQQConfig.{name} must be a number {hint}, got {getattr(self, name)!r}")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ConfigError(f"HQQConfig.iters must be a positive integer, got {self.iters!r}")
        if not 0 <= _num(self.tol) < 1:
            raise ConfigError(f"HQQConfig.tol must be a number in [0, 1), e.g. 1e-4, got {self.tol!r}")
        if not isinstance(self.optimize_scale, bool):
            raise ConfigError(f"HQQConfig.optimize_scale must be True or False, got {self.optimize_scale!r}")

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.dtype != "int" or scheme.double_quant:
            raise ConfigError(
                f"HQQ produces plain affine integers; {scheme.label} is not one. Use an int scheme without double_quant"
            )
        if scheme.symmetric and not self.optimize_scale:
            raise ConfigError(
                "HQQ with a symmetric scheme has a fixed zero point, so with optimize_scale=False there is nothing "
                "to optimize; use symmetric=False (HQQ's own setting) or optimize_scale=True"
            )


def hqq_quantize(
    w: torch.Tensor, scheme: QuantScheme, config: HQQConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """HQQ-quantize ``w [out, in]``: ``(codes uint8 [out, in], scale [R, G] scale_dtype, zero uint8 [R, G] | None)``."""
    config.check_scheme(scheme)
    affine.check_finite(w)
    W = w.detach().float()
    if scheme.granularity == "tensor":  # one group holding everything
        scale, zero = _optimize_groups(W.reshape(1, 1, -1), scheme, config)
    elif scheme.granularity == "channel":
        scale, zero = _optimize_groups(W[:, None, :], scheme, config)
    else:
        # the full groups as one [out, G, g] view, the partial last group (576 = 4.5 x 128) as its own [out, 1, r]
        g = scheme.group_size
        n_full = W.shape[1] // g
        parts = []
        if n_full:
            parts.append(_optimize_groups(W[:, : n_full * g].reshape(W.shape[0], n_full, g), scheme, config))
        if W.shape[1] % g:
            parts.append(_optimize_groups(W[:, n_full * g :, None].transpose(1, 2), scheme, config))
        scale = torch.cat([p[0] for p in parts], dim=1)
        zero = None if scheme.symmetric else torch.cat([p[1] for p in parts], dim=1)
    return affine.quantize_affine(W, scale, zero, scheme), scale, zero


def _optimize_groups(
    Wg: torch.Tensor, scheme: QuantScheme, config: HQQConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The half-quadratic iterations on groups ``Wg [R, G, L]``; returns stored-form ``scale, zero`` ``[R, G]``.

    The iterate is kept in stored form (scale in ``scale_dtype``, integer zero) so that the codes each step sees
    are exactly the codes that would be stored, and their error is the real one; the closed-form updates are
    computed in float32 and projected back. Iteration 0 is round-to-nearest.
    """
    maxq = 2**scheme.bits - 1
    midpoint = float(2 ** (scheme.bits - 1))
    # round-to-nearest start, with the core's conventions (the view is one group of L per [r, g] row)
    grid = QuantScheme(**{**scheme.to_dict(), "granularity": "channel"})
    s0, z0 = affine.choose_qparams(Wg.reshape(-1, Wg.shape[-1]), grid)  # [R*G, 1]
    s_now = s0.reshape(*Wg.shape[:2], 1)
    z_now = None if z0 is None else z0.reshape(*Wg.shape[:2], 1)
    s_best, z_best, err_best = s_now, z_now, None
    beta = config.beta
    for step in range(config.iters + 1):
        s = s_now.float()
        z = midpoint if z_now is None else z_now.float()
        q = torch.clamp(torch.round(Wg / s) + z, 0, maxq)  # [R, G, L], the core's rounding
        residual = Wg - (q - z) * s
        err = residual.pow(2).sum(-1, keepdim=True)  # [R, G, 1]
        if err_best is None:
            err_best = err
        else:
            total_before = float(err_best.sum())
            better = err < err_best
            err_best = torch.where(better, err, err_best)
            s_best = torch.where(better, s_now, s_best)
            if z_best is not None:
                z_best = torch.where(better, z_now, z_best)
            if total_before - float(err_best.sum()) <= config.tol * total_before:
                break  # converged (HQQ likewise stops once its error stops falling)
        if step == config.iters:
            break
        target = Wg - _shrink_lp(residual, beta, config.lp_norm)  # what the dequantized weights should hit
        z_new = (q - target / s).mean(-1, keepdim=True) if z_now is not None else torch.full_like(s, midpoint)
        s_new = s
        if config.optimize_scale:
            centered = q - z_new
            num, den = (centered * target).sum(-1, keepdim=True), (centered * centered).sum(-1, keepdim=True)
            refit = num / den.clamp_min(1e-30)
            s_new = torch.where((den > 0) & (refit > 0) & torch.isfinite(refit), refit, s)
        beta *= config.kappa
        s_now, z_now = _storable(s_new, z_new, scheme)
    return s_best[..., 0], None if z_best is None else z_best[..., 0]


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal operator of ``|x|^p / beta``: ``sign(x) relu(|x| - |x|^(p-1)/beta)``.

    It is nonzero only where ``|x| > beta^(-1/(2-p))`` (0.17 at the default beta 10): for typical LLM weights
    the rounding residual rarely gets there, so the costly ``pow`` is skipped when no element does.
    """
    magnitude = x.abs()
    big = magnitude > beta ** (-1.0 / (2.0 - p))
    if not bool(big.any()):
        return torch.zeros_like(x)
    threshold = magnitude.clamp_min(1e-30).pow(p - 1) / beta  # clamp: |0|^(p-1) would be inf
    return torch.where(big, torch.sign(x) * torch.relu(magnitude - threshold), torch.zeros_like(x))


def _storable(s: torch.Tensor, z: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Project float parameters onto what the format stores: scale in scale_dtype (> 0), integer zero."""
    dtype = scheme.torch_scale_dtype
    stored = s.to(dtype)
    tiny = torch.finfo(dtype).tiny
    stored = torch.where(torch.isfinite(stored) & (stored > 0), stored, torch.full_like(stored, tiny))
    if scheme.symmetric:
        return stored, None
    return stored, torch.round(z).clamp(0, 2**scheme.bits - 1).to(torch.uint8)


def _num(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")  # fails every comparison, so the check reports it
    return float(value)


def quantize_hqq(model: nn.Module, names: list[str], config: QuantConfig, run: MethodRun) -> dict[str, QuantScheme]:
    """The ``hqq`` method: every selected linear on its own (no calibration data), like rtn."""
    options: HQQConfig = config.options  # type: ignore[assignment]  (QuantConfig resolved it)
    if config.scheme.symmetric and config.scheme.bits <= 3:
        warnings.warn(
            f"symmetric {config.scheme.bits}-bit HQQ fits only the scale and clips the largest weights: on SmolLM2 at "
            "int3 g128 it did worse than round-to-nearest (BENCHMARKS.md); HQQ's asymmetric form (the default, "
            "symmetric=False) fits the zero point too and did far better",
            stacklevel=2,
        )
    schemes: dict[str, QuantScheme] = {}
    with torch.no_grad():
        for name in tqdm(names, desc=f"quantize {config.label}", unit="layer", disable=not run.progress):
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ConfigError(f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized")
            codes, scale, zero = hqq_quantize(linear.weight, config.scheme, options)
            set_submodule(model, name, quant_linear_from_codes(linear, codes, scale, zero, config.scheme))
            schemes[name] = config.scheme
    return schemes


register_method(
    "hqq",
    quantize_hqq,
    ("int",),
    QuantScheme(group_size=64, symmetric=False),
    help="HQQ: calibration-free half-quadratic fit of zero (and scale) per group (default int4, g64, asymmetric)",
    options=HQQConfig,
)
