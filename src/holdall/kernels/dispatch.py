"""The kernels' entry in ``core.backends``: which calls they take, and the forward that launches them.

Needs only torch and the core: the Triton module is imported on the first launch, so registering the
backend (and asking it whether it supports a layer) costs nothing on machines without a GPU or Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core import backends
from . import packed

#: The backend's name in ``core.backends`` (``use_backend(BACKEND)`` forces it in tests and benchmarks).
BACKEND = "triton-wq4"
#: Rows (tokens) up to which the kernels run; above it the reference (dequantize + cuBLAS) is faster, and
#: a weight dequantized once is amortised over many rows.
MAX_ROWS = 64
#: Rows handled by the GEMV kernel; more rows go to the tensor-core GEMM kernel.
GEMV_MAX_ROWS = 1
#: Above the reference backend and the default priority 0, so a plain registration elsewhere does not
#: shadow the kernels by accident.
PRIORITY = 10.0

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
_PLAN_ATTR = "_holdall_wq4_plan"


def layer_plan(layer: torch.nn.Module) -> packed.Plan | None:
    """The layer's launch plan, or None when the kernels cannot read its format; cached on the layer.

    The cache key is the scheme, shape and the buffers' addresses: moving the layer (new buffers) or
    replacing a buffer re-checks it; the plan holds no tensors, so the cache keeps no memory alive.
    """
    key = (layer.scheme, layer.out_features, layer.in_features,
           tuple(layer._buffers[name].data_ptr() for name in layer._weight_names))
    cached = layer.__dict__.get(_PLAN_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = None if packed.why_unsupported(layer) is not None else packed.plan(layer)
    layer.__dict__[_PLAN_ATTR] = (key, result)
    return result


def supports(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """CUDA input, bf16/fp16 compute, at most ``MAX_ROWS`` rows, no gradient wanted, a 4-bit format we read."""
    if not x.is_cuda or not hasattr(layer, "scheme") or layer.qdata.device != x.device:
        return False
    if backends.compute_dtype(x) not in _COMPUTE_DTYPES:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > MAX_ROWS:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # training goes through the reference's DequantLinearFunction (it has a backward)
    return layer_plan(layer) is not None


def forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T + b`` with the packed weight read in place; x ``[..., in]``, y in the compute dtype."""
    from . import triton_wq4  # first launch: only now is Triton imported

    p = layer_plan(layer)
    dtype = backends.compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features).to(dtype)
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != p.in_features):
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, p.out_features, dtype=dtype, device=x.device)
    ops = packed.operands(layer, p)
    bias = layer.bias
    # A bias that wants a gradient (any nn.Parameter outside no_grad) is added by autograd after the kernel,
    # so eager inference without no_grad still takes the kernel and the bias still gets its gradient.
    bias_after = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    bias = None if bias is None or bias_after else bias.detach()
    if rows <= GEMV_MAX_ROWS:
        if x2.storage_offset() % 2:  # the GEMV kernel reads x as int32 pairs
            x2 = x2.clone()
        triton_wq4.gemv(ops, p, x2.reshape(-1), bias, out.view(-1))
    else:
        triton_wq4.gemm(ops, p, x2, bias, out)
    if bias_after:
        out = out + layer.bias.to(dtype)
    return out.reshape(*lead, p.out_features)


def register() -> None:
    """Register (or re-register) the backend in ``core.backends``."""
    backends.register_backend(BACKEND, forward, supports, PRIORITY, replace=True)


def unregister() -> None:
    if BACKEND in backends.available_backends():
        backends.unregister_backend(BACKEND)


def norm_fusable(layer: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_gemv` can take this layer: a CUDA ``QuantLinear`` whose default one-row kernel is
    the TMA GEMV (Hopper, rows of whole groups), the Gluon GEMV (int symmetric codes) or the tensor-core GEMV
    (codebooks), in a bf16/fp16 model."""
    if not hasattr(layer, "scheme") or layer.qdata.device.type != "cuda" or dtype not in _COMPUTE_DTYPES:
        return False
    p = layer_plan(layer)
    if p is None:
        return False
    from . import triton_wq4

    config = triton_wq4.default_gemv_config(packed.operands(layer, p), p, layer.qdata.device)
    return config.get("VARIANT") in ("tma", "gluon", "gluon_mma")


class Int8Row(NamedTuple):
    """One row of int8 activations as the ``XQ8`` GEMV rounds them (:func:`holdall.kernels.packed.pack_s8_words`)."""

    words: torch.Tensor  # int32 [n / 4]: per 8 inputs, the odd inputs' int8 then the even ones'
    scales: torch.Tensor  # float32 [n / 8]: the power-of-two scale of each 8 inputs


class FusedRow(NamedTuple):
    """What :func:`fused_gemv` returns: the output row, and with ``norm_out`` the next norm's pieces."""

    y: torch.Tensor  # [out]
    h: torch.Tensor | None  # [out]: y * the next norm's weight (feed it to the next GEMV as x, with norm_in)
    squares: torch.Tensor | None  # float32 partial sums of y^2 (norm_in's first element)
    h8: Int8Row | None = None  # with int8_out: h as int8 words (feed it to the next GEMV as x instead of h)


def fused_gemv(layer: torch.nn.Module, x: torch.Tensor | Int8Row, residual: torch.Tensor | None = None,
               norm_in: tuple[torch.Tensor, float] | None = None,
               norm_out: torch.Tensor | None = None, int8_activations: bool = False,
               int8_out: bool = False, dtype: torch.dtype | None = None, glu: bool = False,
               chained: bool = False) -> FusedRow:
    """One row with the decoder's glue folded into the GEMV's epilogue; ``x [in]``, results ``[out]`` in the
    model's compute dtype (the layer's bias, if any, is added as usual).

    residual: added to the output (the residual stream's add; ``y = x_res + layer(x)``).
    norm_out: the *next* RMSNorm's weight ``[out]``: also return ``h = y * weight`` and ``y``'s partial sums of
        squares, so the next GEMV can apply the norm's ``1 / rms`` itself (``norm_in``);
    norm_in: ``(squares, eps)`` from the producer's ``norm_out`` when ``x`` is its ``h``: computes
        ``layer(rms_norm(y_producer) * weight)`` -- transformers' RMSNorm, except that the ``1 / rms`` scales the
        float32 dot products instead of the rounded row.
    int8_activations: multiply int codes by ``x`` rounded per 8-input word to int8 (W4A8,
        :func:`holdall.kernels.packed.quantize_activations_s8`), inside the kernel (``XQ8``: integer dot
        products, fewer instructions per weight; ``ValueError`` for codebook formats, whose values are not
        integers). ``x`` may then be an :class:`Int8Row` (from a producer's ``int8_out``: the rounding is done;
        ``dtype`` names the model's compute dtype), and ``int8_out=True`` (with ``norm_out``) also returns
        ``h`` as one (``h8``): the same numbers as rounding ``h`` in the next GEMV, handed over instead.
    glu: ``layer`` is a gate projection stacked over its up projection (:func:`holdall.core.linear.stack_outputs`,
        ``[gate; up]``): return ``y = silu(gate) * up`` (``[out / 2]``, rounded as ``F.silu(gate) * up`` rounds the
        two outputs), the SiLU-gated MLP's inner row without a launch of its own; no ``residual`` / ``norm_out``.
    chained: this launch is one link of a decode step, where no kernel writes the layer's weights: the Gluon GEMV
        may then start before the previous kernel ends and read its weights meanwhile (programmatic dependent
        launch, round 11). Leave it off where the kernel before may have written them.
    Each saves a separate norm (or add, or activation) launch; the GEMV's loop is the same as without them (only
    the epilogues change). Only for layers :func:`norm_fusable` accepts.
    """
    from . import triton_wq4

    p = layer_plan(layer)
    ops = packed.operands(layer, p)
    if int8_activations and p.kind == 2:
        raise ValueError(f"int8 activations multiply integer codes; this layer's {p.codebook} values are not")
    if isinstance(x, Int8Row) and not int8_activations:
        raise ValueError("an Int8Row input is int8 activations: pass int8_activations=True")
    config = triton_wq4.default_gemv_config(ops, p, ops.words.device, int8_activations, chained)
    x_scales = None
    if isinstance(x, Int8Row):
        if dtype is None:
            raise ValueError("an Int8Row input needs dtype= (the model's compute dtype)")
        if config.get("XQ8"):
            x, x_scales = x.words, x.scales
        else:  # a tiling without int8 words: the same numbers as floats
            x = packed.unpack_s8_words(x.words, x.scales, dtype)
    else:
        x = x.reshape(-1)
        dtype = x.dtype
        if x.storage_offset() % 2 or not x.is_contiguous():  # the kernel reads x as int32 pairs
            x = x.contiguous().clone()
        if int8_activations and not config.get("XQ8"):  # a tiling without the in-kernel rounding: round here
            x = packed.round_activations_s8(x)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    if residual is not None:
        residual = residual.reshape(-1).to(dtype)
        bias = residual if bias is None else residual + bias
    if glu and (residual is not None or norm_out is not None or p.out_features % 2):
        raise ValueError("glu returns the MLP's inner row silu(gate) * up of a stacked [gate; up] layer (even rows): "
                         "no residual or norm_out")
    out = torch.empty(p.out_features // 2 if glu else p.out_features, dtype=dtype, device=x.device)
    h = squares = h8 = int8_words = None
    if norm_out is not None:
        h = torch.empty_like(out)
        squares = torch.empty(-(-p.out_features // config["BLOCK_N"]), dtype=torch.float32, device=x.device)
        norm_out = (norm_out.reshape(-1).to(dtype).contiguous(), h, squares)
        if int8_out:
            h8 = Int8Row(torch.empty(p.out_features // 4, dtype=torch.int32, device=x.device),
                         torch.empty(p.out_features // 8, dtype=torch.float32, device=x.device))
            if triton_wq4.writes_int8_words(p, config):
                int8_words = h8
    elif int8_out:
        raise ValueError("int8_out hands the next norm's weighted row over: it needs norm_out")
    triton_wq4.gemv(ops, p, x, bias, out, config, norm_in=norm_in, norm_out=norm_out, x_scales=x_scales,
                    int8_out=int8_words, glu=glu)
    if h8 is not None and int8_words is None:  # this tiling cannot write the words: the same ones from h
        q, scales = packed.quantize_activations_s8(h)
        h8.words.copy_(packed.pack_s8_words(q))
        h8.scales.copy_(scales)
    return FusedRow(out, h, squares, h8)


def int8_ready(layer: torch.nn.Module) -> str | None:
    """Why :func:`project_int8` cannot take ``layer`` (None when it can): a 4-bit layer with integer codes."""
    if not hasattr(layer, "scheme"):
        return f"{type(layer).__name__} is not a holdall QuantLinear"
    if layer.scheme.dtype != "int" or layer.scheme.bits != 4:
        return f"its weights are {layer.scheme.label}, not 4-bit integer codes"
    return None


def project_int8(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a 4-bit integer layer with ``x`` rounded per 8-input word to int8 first (W4A8,
    :func:`holdall.kernels.packed.round_activations_s8`): one row on the one-row TMA kernel does the rounding
    and integer dot products itself (``XQ8``); anything else rounds ``x`` in torch and runs the layer as usual
    (the reference, on any device). ``x [..., in]``; same shape and dtype rules as the layer."""
    reason = int8_ready(layer)
    if reason is not None:
        raise ValueError(f"int8 activations need a 4-bit integer layer: {reason}")
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 1 and supports(layer, x) and norm_fusable(layer, backends.compute_dtype(x)):
        y = fused_gemv(layer, x.reshape(-1).to(backends.compute_dtype(x)), int8_activations=True).y
        return y.reshape(*x.shape[:-1], -1)
    return layer(packed.round_activations_s8(x))
