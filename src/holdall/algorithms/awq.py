"""AWQ, Activation-aware Weight Quantization (Lin et al. 2023, arXiv 2306.00978), on the sequential engine.

A few input channels of every linear carry most of the activation energy; rounding their weights costs the most
output error. AWQ protects them without mixed precision: it multiplies the weight's input columns by per-channel
scales ``s`` (large for salient channels, so their weights use more of the integer grid) and divides the input
by ``s``, which leaves the float function unchanged: ``W x = (W diag(s)) (diag(s)⁻¹ x)``. The division is
folded into whatever produced the input — an RMSNorm's weight or a linear's output rows — so it costs nothing at
inference.

Per decoder layer and per *scaling group* (the linears reading one input, with the module producing it):

==========  ========================  ====================================================
consumers   producer (1/s goes to)    output the search compares
==========  ========================  ====================================================
q, k, v     input_layernorm           the attention block (``self_attn``), o_proj included
o           v (if shapes allow)       o's own output
gate, up    post_attention_layernorm  the MLP block (``mlp``), down included
down        up                        down's own output
==========  ========================  ====================================================

1. **Scale search.** With ``x̄`` the mean ``|x|`` per input channel and ``w̄`` the mean of ``|W|`` normalized by
   its quantization group's max (per input channel, over every consumer's rows), try ``α = i / n_grid`` for
   ``i < n_grid``: ``s = x̄^α / (w̄^(1-α) + 1e-4)`` (duo scaling) or ``s = x̄^α``, clamped to ``>= 1e-4`` and
   normalized by ``sqrt(max s · min s)``. Each candidate's consumers are round-to-nearest quantized as
   ``Q(W s) / s`` under the configured scheme and the block is re-run on the calibration inputs; the ``α`` with
   the lowest output squared error wins. The identity (``s = 1``: plain RTN) is always a candidate too, so the
   chosen scales never do worse than RTN on the search's own objective (AutoAWQ's grid lacks this guard: with
   duo scaling its ``α = 0`` is ``1 / w̄``, not RTN).
2. **Fold.** ``producer /= s`` (norm weight, or a linear's output rows and bias) and ``W *= s`` for every
   consumer. For a linear producer that the engine has already quantized (v before o, up before down) the fold
   divides its stored per-row scales: each row's codes stay, exactly as if the row had been scaled before
   rounding (round-to-nearest is scale-equivariant per row), up to the ``scale_dtype`` rounding of the new scale.
3. **Clip search** (AutoAWQ's ``auto_clip``): for every (output row, group) try max-value shrinks
   ``1 - i / clip_grid`` for ``i < clip_max_shrink · clip_grid`` (``i = 0`` is no clipping), clamp the scaled
   weight to ``±shrink · absmax``, round, and keep the shrink with the least error of that group's contribution to
   the output on ``clip_tokens`` sampled calibration tokens, ``mean_t (x_g · (w_g - q_g))²``. It is computed from
   the block-diagonal Gram matrix ``X_gᵀ X_g`` of the sampled tokens, so memory is that of the weight (AutoAWQ
   batches output channels instead). Query and key projections are not clipped (their error is amplified by the
   attention logits, as AutoAWQ notes). The clipped group is kept only if the block's output error does not grow.
4. **Round** the scaled, clipped weight to nearest into a core ``QuantLinear``.

holdall's engine runs the groups in true-sequential order: each group's inputs come from the layer with the
earlier groups already quantized (AutoAWQ takes every group's inputs from the float layer; ``true_sequential=False``
does that here), and the quantized layer's outputs feed the next layer.

Grouped-query attention: ``v_proj`` produces ``kv_heads · head_dim`` channels that ``o_proj`` reads
``heads / kv_heads`` times over (each kv head serves several query heads), so o's input channels cannot each get
their own scale through v's rows; the v→o group is then not scaled (only clipped and rounded), as in AutoAWQ.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.linear import QuantLinear
from ..core.scheme import QuantScheme
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models.families import Family, get_family
from . import fake_quant_triton
from .config import MethodOptions, MethodResult, MethodRun, QuantConfig, register_method, select_layers
from .gram import add_gram, half_mm_float32
from .sequential import CalibrationReport, run_sequential

#: families whose block norms scale as ``x · weight`` (Gemma's ``x · (1 + weight)`` would need another fold)
AWQ_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class AWQConfig(MethodOptions):
    """AWQ's search settings (the scheme — bits, group size, symmetry — lives in ``QuantConfig.scheme``).

    n_grid: exponents tried in the scale search, ``α = i / n_grid`` for ``i = 0 .. n_grid - 1`` (AutoAWQ: 20).
    duo_scaling: ``s = x̄^α / w̄^(1-α)`` (AutoAWQ's default); False: ``s = x̄^α`` (the paper's form).
    clip: run the max-value clipping search after scaling (AutoAWQ's ``apply_clip``).
    clip_grid, clip_max_shrink: shrink factors ``1 - i / clip_grid`` for ``i < clip_max_shrink · clip_grid``
        (AutoAWQ: 20 and 0.5, i.e. 1.0, 0.95, ..., 0.55).
    clip_tokens: calibration tokens the clip search looks at, taken at an even stride (AutoAWQ: 512).
    true_sequential: take each group's inputs after the earlier groups of the layer were quantized; False = all
        from the float layer in one pass (AutoAWQ's order).
    """

    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    true_sequential: bool = True

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_grid", "clip_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AWQConfig.{name} must be a positive integer, got {value!r}")
        for name in ("duo_scaling", "clip", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"AWQConfig.{name} must be True or False, got {getattr(self, name)!r}")
        shrink = self.clip_max_shrink
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink < 1:
            raise ConfigError(f"AWQConfig.clip_max_shrink must be a number in (0, 1), e.g. 0.5, got {shrink!r}")

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.dtype != "int" or scheme.double_quant:
            raise ConfigError(
                f"AWQ produces plain affine integers; {scheme.label} is not one (double quantization would change "
                "the scales the search rounded against). Use an int scheme without double_quant"
            )
        if self.clip and scheme.granularity == "tensor":
            raise ConfigError(
                "AWQ's clip search picks a threshold per output row and group, but a per-tensor scheme shares one "
                "scale across all rows; use granularity 'group' or 'channel', or AWQConfig(clip=False)"
            )


# --- the formulas ----------------------------------------------------------------------------------------
def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest under ``scheme`` and back to float32: what ``QuantLinear.from_linear`` stores, bit for bit.

    The core's arithmetic (``core/affine.py``: scale rounded to ``scale_dtype`` before the codes, tiny scale for an
    all-zero group, asymmetric range widened to include 0, round half to even) in one pass over a group view,
    without the core's per-call validation: the search calls this hundreds of times per layer on weights it has
    already checked.
    """
    groups, unview = _groups(w.float(), scheme)  # [R, G, L]
    maxq = 2**scheme.bits - 1
    if scheme.symmetric:
        scale = groups.abs().amax(-1, keepdim=True) / (maxq / 2)
        lo = None
    else:
        lo = groups.amin(-1, keepdim=True).clamp(max=0)
        scale = (groups.amax(-1, keepdim=True).clamp(min=0) - lo) / maxq
    dtype = scheme.torch_scale_dtype
    scale = scale.to(dtype)
    if not torch.isfinite(scale).all():
        raise ConfigError(f"weights overflow {scheme.scale_dtype} scales; use scale_dtype='float32' (or 'bfloat16')")
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).tiny), scale).float()
    zero = float(2 ** (scheme.bits - 1)) if lo is None else torch.round(-lo / scale).clamp(0, maxq)
    # round(w / s) + z, clamped, minus z, times s: in place on one [R, G, L] temporary (the search calls this for
    # every candidate of every group; each full-size temporary is a pass over the weight)
    q = torch.div(groups, scale).round_().add_(zero).clamp_(0, maxq)
    return unview(q.sub_(zero).mul_(scale))


def scaled_fake_quantize(
    w: torch.Tensor,
    scheme: QuantScheme,
    s: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``Q(clamp_groups(w · s, max_val)) / s`` as ``out_dtype``: a consumer's weight as the scaled, clipped,
    rounded layer computes it, in the original frame (``s`` None: no column scale, ``max_val`` None: no clip).

    On a GPU with Triton, group schemes take one fused pass (``fake_quant_triton``, bit-identical in float32);
    elsewhere, and wherever the fused pass meets a non-finite scale (so that :func:`fake_quantize` raises its
    error), the eager passes run."""
    if fake_quant_triton.usable(w, scheme):
        flag = torch.zeros(1, dtype=torch.int32, device=w.device)
        out = fake_quant_triton.fake_quantize(w, scheme, s, max_val, out_dtype, flag)
        if not flag.item():
            return out
    ws = w.float() * s if s is not None else w.float()
    if max_val is not None:
        ws = clamp_groups(ws, max_val, scheme)
    q = fake_quantize(ws, scheme)
    q = q.div_(s) if s is not None else q  # q is a fresh tensor: divided in place
    return q.to(out_dtype)


def _groups(w: torch.Tensor, scheme: QuantScheme):
    """``w [out, in]`` as quantization groups ``[R, G, L]`` (a partial last group zero-padded, which changes no
    group's parameters) and the function mapping such a view back to ``[out, in]``."""
    n_out, n_in = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, -1), lambda v: v.reshape(n_out, n_in)
    g = scheme.group_size if scheme.granularity == "group" else n_in
    n_groups = -(-n_in // g)
    if n_groups * g == n_in:  # whole groups: a view, no copy
        return w.reshape(n_out, n_groups, g), lambda v: v.reshape(n_out, n_in)
    padded = F.pad(w, (0, n_groups * g - n_in)).reshape(n_out, n_groups, g)
    return padded, lambda v: v.reshape(n_out, n_groups * g)[:, :n_in]


def activation_mean(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``x̄``: mean ``|x|`` per input channel of ``x [tokens, in]``, float32 ``[in]`` (summed in chunks)."""
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for t0 in range(0, x.shape[0], chunk):
        total += x[t0 : t0 + chunk].float().abs().sum(0, dtype=torch.float64)
    return (total / max(x.shape[0], 1)).float()


def weight_mean(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w̄``: mean over rows of ``|W|`` divided by its quantization group's ``max |W|`` (+1e-6), float32 ``[in]``.

    Groups follow the scheme: ``group_size`` columns (a partial last group is its own group), a whole row
    (channel), or the whole tensor.
    """
    a = w.detach().float().abs()
    n_in = a.shape[1]
    if scheme.granularity == "tensor":
        return (a / (a.amax() + 1e-6)).mean(0)
    g = scheme.group_size if scheme.granularity == "group" else n_in
    n_groups = -(-n_in // g)
    padded = F.pad(a, (0, n_groups * g - n_in)).reshape(a.shape[0], n_groups, g)
    normed = padded / (padded.amax(-1, keepdim=True) + 1e-6)
    return normed.reshape(a.shape[0], -1)[:, :n_in].mean(0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, duo_scaling: bool) -> torch.Tensor:
    """Per-input-channel scales for one exponent ``alpha`` (AutoAWQ's formula, normalized to a geometric mean
    of max and min of 1); non-finite entries become 1."""
    if duo_scaling:
        if w_mean is None:
            raise ConfigError("duo scaling needs the weight mean w̄")
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w [out, in]`` clamped to ``±max_val`` of its (row, group); ``max_val`` is ``[out, G]`` (float32)."""
    groups, unview = _groups(w.float(), scheme)
    limit = max_val[..., None]
    return unview(torch.maximum(torch.minimum(groups, limit), -limit))


@dataclass
class ClipResult:
    max_val: torch.Tensor  # [out, G] the chosen clipping threshold per row and group (== absmax: not clipped)
    error: torch.Tensor  # [out, G] the chosen threshold's error of the group's output contribution
    error_unclipped: torch.Tensor  # [out, G] the same error without clipping

    def apply(self, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return clamp_groups(w, self.max_val, scheme)

    @property
    def clipped_fraction(self) -> float:
        """Share of (row, group) pairs whose threshold is below their max (clipping chosen)."""
        return float((self.error < self.error_unclipped).float().mean())


def clip_search(
    w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5
) -> ClipResult:
    """Per (row, group) max-value shrink of ``w [out, in]`` minimizing ``mean_t (x_tg · (w_g - Q(clip(w))_g))²``
    on the tokens ``x [tokens, in]``; groups by ``scheme`` (group or channel granularity). Shrink 1 (no
    clipping) is the first candidate, so no group's error grows."""
    if scheme.granularity == "tensor":
        raise ConfigError("the clip search needs group or channel granularity (one scale per row and group)")
    w = w.detach().float()
    n_out, n_in = w.shape
    g = scheme.group_size if scheme.granularity == "group" else n_in
    n_groups = -(-n_in // g)
    pad = n_groups * g - n_in
    xg = F.pad(x.float(), (0, pad)).reshape(-1, n_groups, g).transpose(0, 1)  # [G, t, g]
    gram = xg.transpose(1, 2) @ xg / max(x.shape[0], 1)  # [G, g, g]: X_gᵀ X_g / t
    absmax = F.pad(w, (0, pad)).reshape(n_out, n_groups, g).abs().amax(-1)  # [out, G]
    best_val = absmax.clone()
    best_err = unclipped = None
    for i in range(max(1, int(max_shrink * grid))):
        max_val = absmax * (1 - i / grid)
        delta = w - scaled_fake_quantize(w, scheme, max_val=max_val)
        delta = F.pad(delta, (0, pad)).reshape(n_out, n_groups, g).transpose(0, 1)  # [G, out, g]
        err = ((delta @ gram) * delta).sum(-1).transpose(0, 1)  # [out, G]
        if best_err is None:
            best_err, unclipped = err.clone(), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_val = torch.where(better, max_val, best_val)
    return ClipResult(best_val, best_err, unclipped)


# --- the losses the search minimizes ---------------------------------------------------------------------
class _LinearLoss:
    """``Σ ||(W - W') X||²`` over linears that read ``X``: the block *is* the linear (o, down). With more tokens
    than input channels it works from ``H = Xᵀ X`` (``tr(Δ H Δᵀ)``: cost independent of the token count).

    On a GPU with half-precision activations (a bf16 model calibrated there) ``H`` is accumulated on the tensor
    cores (exact products, ``gram.add_gram``) and each loss's ``Δ H`` is a bf16 GEMM with float32 accumulation:
    Δ and H rounded to bf16 move a loss by ~1e-5 of itself (rounding errors of random sign over millions of
    terms), far below the gaps between the grid's candidates, and at the down projection's width
    (``[4096, 11008] x [11008, 11008]``, 1 TFLOP per candidate) it is ~10x faster than float32 on the CUDA cores.
    Elsewhere everything is float32.
    """

    def __init__(self, x: torch.Tensor, weights: list[torch.Tensor], chunk: int = 8192):
        n_in = x.shape[-1]
        self.gram: torch.Tensor | None = None  # float32, or the activations' half dtype on a GPU
        self.x: torch.Tensor | None = None
        if x.shape[0] > n_in:
            gram = torch.zeros(n_in, n_in, dtype=torch.float32, device=x.device)
            for t0 in range(0, x.shape[0], chunk):
                add_gram(gram, x[t0 : t0 + chunk])
            half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            self.gram = gram.to(x.dtype) if half else gram  # one copy kept: 242 MiB in bf16 at 11008 channels
        else:
            self.x = x.float()
        self.weights = weights
        self.energy = sum(self._sq(w) for w in weights)

    def _sq(self, d: torch.Tensor) -> float:
        if self.gram is not None:
            if self.gram.dtype == torch.float32:
                dh = d @ self.gram
            else:  # float32 products of the bf16-rounded Δ and H; upcast where torch lacks the tensor-core path
                dh = half_mm_float32(d.to(self.gram.dtype), self.gram)
                if dh is None:
                    dh = d.to(self.gram.dtype).float() @ self.gram.float()
            return float((dh * d).sum(dtype=torch.float64))
        return float((self.x @ d.T).pow(2).sum(dtype=torch.float64))

    def loss(self, candidates: list[torch.Tensor]) -> float:
        return sum(self._sq(w - c) for w, c in zip(self.weights, candidates))


class _BlockLoss:
    """``||B(X) - B'(X)||²`` of the block ``B`` (attention / MLP) that reads the group's output, re-run on the
    stored inputs with candidate weights in the consumers; the float outputs are computed once."""

    def __init__(
        self,
        block: nn.Module,
        call: tuple[tuple, dict[str, Any]],
        x: torch.Tensor,
        linears: list[nn.Linear],
        seq_len: int,
        batch_size: int,
    ):
        self.block, (self.args, self.kwargs), self.linears = block, call, linears
        self.batches = list(x.reshape(-1, seq_len, x.shape[-1]).split(batch_size))
        self.reference = [self._run(b) for b in self.batches]
        self.energy = sum(float(y.double().pow(2).sum()) for y in self.reference)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x, *self.args, **self.kwargs)
        return y[0] if isinstance(y, tuple) else y

    def loss(self, candidates: list[torch.Tensor]) -> float:
        """Summed on the device, read once per candidate (one synchronization, not one per batch)."""
        total = None
        with _swapped_weights(self.linears, candidates):
            for b, ref in zip(self.batches, self.reference):
                part = squared_distance(self._run(b), ref)
                total = part if total is None else total + part
        return float(total)


def squared_distance(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``Σ (y - ref)²`` as a float64 0-d tensor. Half-precision outputs are subtracted in float32 (two bf16 or fp16
    values differ by a float32 exactly unless one is below the other's last bit) and squared there; float32 and
    wider outputs in float64."""
    if y.dtype in (torch.bfloat16, torch.float16):
        return (y.float() - ref.float()).pow_(2).sum(dtype=torch.float64)
    return (y.double() - ref.double()).pow_(2).sum()


@contextlib.contextmanager
def _swapped_weights(linears: list[nn.Linear], weights: list[torch.Tensor]) -> Iterator[None]:
    originals = [linear.weight.data for linear in linears]
    try:
        for linear, w in zip(linears, weights):
            linear.weight.data = w.to(dtype=linear.weight.dtype, device=linear.weight.device)
        yield
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.data = w


# --- scaling groups --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingRule:
    """One scaling group of a decoder block, names relative to the block."""

    consumers: tuple[str, ...]  # every linear reading the input (all are scaled; the targeted ones quantized)
    producer: str  # the module whose output is that input: the 1/s is folded into it
    block: str | None  # the module whose output the search compares; None = the consumers themselves


def scaling_rules(family: Family) -> list[ScalingRule]:
    """AutoAWQ's groups for a Llama-shaped block, from the family's layer names."""
    att, mlp = family.attention_linears, family.mlp_linears
    attn_norm, mlp_norm = family.block_norms[:2]
    return [
        ScalingRule(att[:-1], attn_norm, _common_parent(att[:-1])),  # q, k, v read the normed hidden state
        ScalingRule(att[-1:], att[-2], None),  # o reads the attention mix of v's output (shapes permitting)
        ScalingRule(mlp[:-1], mlp_norm, _common_parent(mlp[:-1])),  # gate, up read the normed hidden state
        ScalingRule(mlp[-1:], mlp[-2], None),  # down reads act(gate) * up: scaling up's rows scales it
    ]


def _common_parent(names: tuple[str, ...]) -> str | None:
    parents = {name.rpartition(".")[0] for name in names}
    return parents.pop() if len(parents) == 1 and "" not in parents else None


def _unclipped(family: Family) -> set[str]:
    """Query/key projections (the attention input group but its last member, v); a fused qkv as a whole."""
    group = family.attention_linears[:-1]
    return set(group[:-1]) if len(group) >= 3 else set(group)


def fold_inverse_scale(module: nn.Module, s: torch.Tensor) -> None:
    """Divide ``module``'s output channels by ``s``: a norm's weight (and bias), a linear's rows and bias, or a
    ``QuantLinear``'s per-row scales and bias (its codes are unchanged). Call :func:`fold_problem` first."""
    problem = fold_problem(module, s.numel())
    if problem:
        raise ConfigError(problem)
    if isinstance(module, QuantLinear):
        scale = module._buffers["scale"]
        new = scale.float() / s.to(scale.device)[:, None]
        tiny = torch.finfo(scale.dtype).tiny
        module._buffers["scale"] = new.to(scale.dtype).clamp_min(tiny)
    else:
        weight = module.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.data.copy_((weight.data.float() / s.to(weight.device).reshape(shape)).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.copy_((bias.data.float() / s.to(bias.device)).to(bias.dtype))


def fold_problem(module: nn.Module, channels: int) -> str | None:
    """Why 1/s cannot be folded into ``module``'s ``channels`` outputs, or None if it can."""
    name = type(module).__name__
    if isinstance(module, QuantLinear):
        scheme = module.scheme
        if scheme.dtype != "int" or scheme.double_quant or scheme.granularity == "tensor":
            return f"the producer {name} stores {scheme.label} scales that cannot be rescaled per row"
        if module.out_features != channels:
            return f"the producer has {module.out_features} outputs, the consumers read {channels} channels"
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape[0] != channels:
        got = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        return f"the producer {name} has weight {got}, the consumers read {channels} channels"
    if not isinstance(module, nn.Linear) and weight.dim() != 1:
        return f"the producer {name} is neither a linear nor a norm with a 1-D weight"
    return None


# --- the engine's side ----------------------------------------------------------------------------------
class InputObserver:
    """Keeps the group's input activations ``[tokens, in]``: AWQ re-runs the block on them for every candidate."""

    def __init__(self, names: list[str]):
        self.names = names
        self.chunks: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        self.chunks.append(x.detach().clone())

    def inputs(self) -> torch.Tensor:
        if not self.chunks:
            raise DataError(f"no calibration activations reached {', '.join(self.names)}")
        return torch.cat(self.chunks)


class AWQQuantizer:
    """AWQ as a :class:`~holdall.algorithms.sequential.LayerQuantizer` (with a ``layer_scope``).

    quantize_weights=False runs the scale search and folds the scales but keeps every linear float (and skips the
    clip search, which changes the function): the model then computes what it computed before.
    """

    def __init__(
        self,
        family: Family,
        scheme: QuantScheme,
        options: AWQConfig,
        label: str,
        seq_len: int,
        batch_size: int = 8,
        quantize_weights: bool = True,
    ):
        if family.model_type not in AWQ_FAMILIES:
            raise UnsupportedModelError(
                f"AWQ folds its scales into RMSNorm weights of the form x·w; {family.model_type} is not checked for "
                f"that (supported: {', '.join(AWQ_FAMILIES)}). Use gptq or hqq for this model"
            )
        options.check_scheme(scheme)
        self.family, self.scheme, self.options, self.label = family, scheme, options, label
        self.seq_len, self.batch_size, self.quantize_weights = seq_len, batch_size, quantize_weights
        self.rules = scaling_rules(family)
        self.unclipped = _unclipped(family)
        self._layer: nn.Module | None = None
        self._prefix = ""
        self._calls: dict[str, tuple[tuple, dict[str, Any]]] = {}

    @contextlib.contextmanager
    def layer_scope(self, index: int, layer: nn.Module) -> Iterator[None]:
        """Record how the layer calls its attention / MLP blocks (rotary tables, masks) while it is calibrated."""
        self._layer, self._prefix, self._calls = layer, f"{self.family.layers_path}.{index}.", {}
        handles = []
        for block in {rule.block for rule in self.rules if rule.block is not None}:
            module = _find(layer, block)
            if module is not None:
                handles.append(module.register_forward_pre_hook(self._recorder(block), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._layer, self._calls = None, {}

    def _recorder(self, block: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if block not in self._calls:  # the first call: the same for every batch (broadcast over windows)
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self._calls[block] = (tuple(args[1:]), rest)

        return hook

    def observer(self, names: list[str], linears: list[nn.Linear]) -> InputObserver:
        return InputObserver(names)

    def quantize(
        self, names: list[str], linears: list[nn.Linear], observer: InputObserver
    ) -> list[tuple[nn.Module, dict[str, Any]]]:
        if self._layer is None:
            raise ConfigError("AWQQuantizer.quantize runs inside the engine's layer_scope (use run_sequential)")
        layer = self._layer
        rels = [name.removeprefix(self._prefix) for name in names]
        rule = next((r for r in self.rules if rels[0] in r.consumers), None)
        if rule is None:
            raise ConfigError(f"{names[0]} is in none of AWQ's scaling groups for {self.family.model_type}")
        consumers = {rel: layer.get_submodule(rel) for rel in rule.consumers}
        x = observer.inputs()
        search = _GroupSearch(self, rule, consumers, set(rels), x)
        result = search.run()
        modules = []
        for rel, linear in zip(rels, linears):
            module = QuantLinear.from_linear(linear, self.scheme) if self.quantize_weights else linear
            info = dict(result, clipped=search.clipped_fraction.get(rel, 0.0), notes=list(result["notes"]))
            modules.append((module, info))
        return modules

    def block_call(self, block: str) -> tuple[tuple, dict[str, Any]]:
        if block not in self._calls:
            raise ConfigError(
                f"AWQ did not see the decoder layer call {block}; this model's block structure differs from "
                f"{self.family.model_type}'s usual layout"
            )
        return self._calls[block]


class _GroupSearch:
    """Scale search, fold, clip search for one scaling group; leaves the consumers' float weights scaled/clipped."""

    def __init__(
        self, quantizer: AWQQuantizer, rule: ScalingRule, consumers: dict[str, nn.Module], targets: set[str],
        x: torch.Tensor,
    ):
        self.q, self.rule, self.consumers, self.targets, self.x = quantizer, rule, consumers, targets, x
        self.scheme, self.options = quantizer.scheme, quantizer.options
        for rel, module in consumers.items():
            if not torch.isfinite(module.weight).all():
                raise DataError(
                    f"the weight of {quantizer._prefix + rel} holds NaN/Inf; fix the checkpoint before quantizing"
                )
        self.weights = {rel: m.weight.detach().float().clone() for rel, m in consumers.items()}
        self.clipped_fraction: dict[str, float] = {}

    def run(self) -> dict[str, Any]:
        why_not = self._why_not_scaled()
        loss = self._loss()
        rtn = loss.loss(self._candidates(None, {}))
        if not math.isfinite(rtn):
            raise DataError(
                f"the output of {self._full(self.rule.block or self.rule.consumers[0])} is NaN/Inf with rounded "
                "weights on the calibration data; its weights overflow this dtype. Calibrate in float32"
            )
        best_s, best_alpha, best = None, None, rtn
        if why_not is None:
            x_mean = activation_mean(self.x)
            w_mean = None
            if self.options.duo_scaling:
                w_mean = weight_mean(torch.cat(list(self.weights.values())), self.scheme)
            for i in range(self.options.n_grid):
                alpha = i / self.options.n_grid
                s = awq_scales(x_mean, w_mean, alpha, self.options.duo_scaling)
                value = loss.loss(self._candidates(s, {}))
                if value < best:  # NaN never wins
                    best_s, best_alpha, best = s, alpha, value
        search_loss = best
        clips: dict[str, ClipResult] = {}
        clip_dropped = False
        if self.q.quantize_weights and self.options.clip:
            clips = self._clip(best_s)
            if clips:
                value = loss.loss(self._candidates(best_s, clips))
                if value <= best:
                    best = value
                else:  # per-group contributions improved, but the block's output did not: keep the unclipped one
                    clips, clip_dropped = {}, True
        self._apply(best_s, clips)
        energy = loss.energy if loss.energy > 0 else 1.0
        return {
            "rel_error": math.sqrt(max(best, 0.0) / energy),
            "rtn_rel_error": math.sqrt(max(rtn, 0.0) / energy),
            "search_rel_error": math.sqrt(max(search_loss, 0.0) / energy),
            "alpha": best_alpha,
            "scaled_into": self._full(self.rule.producer) if best_s is not None else None,
            "not_scaled": why_not,
            "clip_dropped": clip_dropped,
            "notes": [],
        }

    def _full(self, rel: str) -> str:
        return self.q._prefix + rel

    def _why_not_scaled(self) -> str | None:
        for rel, module in self.consumers.items():
            if type(module) is not nn.Linear:
                kind = type(module).__name__
                return f"{self._full(rel)} is a {kind}, not a float linear: its columns cannot be scaled"
        producer = _find(self.q._layer, self.rule.producer)
        channels = next(iter(self.weights.values())).shape[1]
        if producer is None:
            return f"no producer module {self._full(self.rule.producer)}"
        if isinstance(producer, (nn.Linear, QuantLinear)) and producer.out_features != channels:
            # grouped-query attention: v has kv_heads·head_dim outputs, o reads heads·head_dim channels (each kv
            # head repeated for heads/kv_heads query heads), so no per-channel scale of o's input maps onto v's rows
            why = (
                " (grouped-query attention: each kv head serves several query heads)"
                if self.rule.producer in self.q.family.attention_linears else ""
            )
            return (
                f"{self._full(self.rule.producer)} has {producer.out_features} outputs but "
                f"{self._full(self.rule.consumers[0])} reads {channels} channels{why}: the scales cannot be folded "
                "into it, so this group is not scaled (as in AutoAWQ)"
            )
        return fold_problem(producer, channels)

    def _loss(self) -> _LinearLoss | _BlockLoss:
        rels = list(self.consumers)
        if self.rule.block is None:
            return _LinearLoss(self.x, [self.weights[r] for r in rels])
        block = self.q._layer.get_submodule(self.rule.block)
        return _BlockLoss(
            block, self.q.block_call(self.rule.block), self.x, [self.consumers[r] for r in rels], self.q.seq_len,
            self.q.batch_size,
        )

    def _candidates(self, s: torch.Tensor | None, clips: dict[str, ClipResult]) -> list[torch.Tensor]:
        """Every consumer's weight as the group would compute in the original frame: ``Q(clip(W s)) / s`` for the
        targeted ones, the float weight for the others."""
        out = []
        for rel, w in self.weights.items():
            if rel not in self.targets:
                out.append(w)
                continue
            max_val = clips[rel].max_val if rel in clips else None
            out.append(scaled_fake_quantize(w, self.scheme, s, max_val))
        return out

    def _clip(self, s: torch.Tensor | None) -> dict[str, ClipResult]:
        if self.scheme.granularity == "tensor":
            return {}
        step = max(1, self.x.shape[0] // self.options.clip_tokens)
        xs = self.x[::step].float()
        if s is not None:
            xs = xs / s
        clips = {}
        for rel in self.weights:
            if rel not in self.targets or rel in self.q.unclipped:
                continue
            w = self.weights[rel] * s if s is not None else self.weights[rel]
            clips[rel] = clip_search(w, xs, self.scheme, self.options.clip_grid, self.options.clip_max_shrink)
        return clips

    def _apply(self, s: torch.Tensor | None, clips: dict[str, ClipResult]) -> None:
        """Fold 1/s into the producer, write the scaled (and clipped) weights into the float consumers."""
        if s is not None:
            fold_inverse_scale(self.q._layer.get_submodule(self.rule.producer), s)
        for rel, module in self.consumers.items():
            w = self.weights[rel] * s if s is not None else self.weights[rel]
            if rel in clips:
                w = clips[rel].apply(w, self.scheme)
                self.clipped_fraction[rel] = clips[rel].clipped_fraction
            module.weight.data.copy_(w.to(module.weight.dtype))


def _find(layer: nn.Module, rel: str) -> nn.Module | None:
    try:
        return layer.get_submodule(rel)
    except AttributeError:
        return None


# --- the method -----------------------------------------------------------------------------------------
def quantize_awq(model: nn.Module, names: list[str], config: QuantConfig, run: MethodRun) -> MethodResult:
    """The ``awq`` method: the sequential engine with :class:`AWQQuantizer`."""
    options: AWQConfig = config.options  # type: ignore[assignment]  (QuantConfig resolved it)
    calibration = config.calibration
    if run.calibration_ids is None or calibration is None:
        raise ConfigError("awq needs calibration data; call it through holdall.quantize(model, config, tokenizer=...)")
    ids = run.calibration_ids
    quantizer = AWQQuantizer(
        get_family(model), config.scheme, options, config.label, int(ids.shape[1]), calibration.batch_size
    )
    result = run_sequential(
        model, names, quantizer, ids, true_sequential=options.true_sequential, batch_size=calibration.batch_size,
        device=calibration.device, progress=run.progress,
    )
    return MethodResult({name: config.scheme for name in names}, result.report.to_dict())


def awq_scale_model(
    model: nn.Module, calibration_ids: torch.Tensor, config: QuantConfig | None = None, *, progress: bool = False
) -> CalibrationReport:
    """AWQ's scale search and fold only: every selected linear stays float (``W s``, no clipping, no rounding) and
    the norms / producers hold ``1/s``, so the model computes what it computed before. For checking the fold, and
    for exporting scaled float weights to another quantizer. ``config`` defaults to ``QuantConfig.for_method("awq")``
    (its scheme is what the search rounds against)."""
    config = config if config is not None else QuantConfig.for_method("awq")
    if config.method != "awq":
        raise ConfigError(f"awq_scale_model needs an awq QuantConfig, got method {config.method!r}")
    options: AWQConfig = config.options  # type: ignore[assignment]
    quantizer = AWQQuantizer(
        get_family(model), config.scheme, options, config.label + " (scales only)", int(calibration_ids.shape[1]),
        config.calibration.batch_size, quantize_weights=False,
    )
    result = run_sequential(
        model, select_layers(model, config), quantizer, calibration_ids, true_sequential=options.true_sequential,
        batch_size=config.calibration.batch_size, device=config.calibration.device, progress=progress,
    )
    return result.report


register_method(
    "awq",
    quantize_awq,
    ("int",),
    QuantScheme(group_size=128, symmetric=False),
    help="AWQ: activation-aware per-channel scales folded into the norms, clip search, then round-to-nearest "
    "(default int4, groups of 128, asymmetric as AutoAWQ's GEMM; 128x512 calibration tokens)",
    options=AWQConfig,
    calibration=(128, 512),
)
