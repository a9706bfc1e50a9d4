"""AWQ's candidate weights ``Q(clip(W·s)) / s`` in one pass on a GPU (Triton); the torch twin is
``awq.scaled_fake_quantize``'s eager path, built from ``awq.fake_quantize`` and ``awq.clamp_groups``.

Why: the AWQ search rounds every consumer's weight once per candidate — 20 scale exponents and 10 clip shrinks
per scaling group — and the eager form makes ~8 full float32 passes over the weight for each (scale, pad, group
max, divide, round, shift, clamp, unshift, multiply, divide again). At Llama-2-7B width that was 0.22 s of a
layer's 2.2 s on an H200; here one program reads a tile of ``rows x one group`` once, fits the group's scale (and
zero point) in registers and writes the candidate once, in the dtype the caller multiplies with.

Same arithmetic as the eager path on the GPU, operation by operation: the group's range times the float32
reciprocal of ``maxq`` (or ``maxq / 2``), as torch on CUDA divides by a Python number (not IEEE division); IEEE
division elsewhere (``div_rn``: Triton's ``/`` is approximate); round half to even (``rint``); the scale rounded to
``scale_dtype`` (round to nearest even) before the codes; a zero scale replaced by that dtype's smallest normal; the
asymmetric range widened to include 0; a partial last group's missing columns read as 0 (which changes no group's
parameters). On float32 outputs the two agree bit for bit (``tests/test_awq.py``, on the device). Triton is
imported on the first call only.
"""

from __future__ import annotations

import functools
import os

import torch

from ..core.scheme import QuantScheme

#: widest quantization group one program holds (a [BLOCK_R, group] float32 tile in registers); wider groups and
#: per-channel schemes take the eager path
MAX_GROUP = 1024

_SCALE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_kernel = None  # compiled lazily: CPU machines need not have Triton, and importing it costs time


def usable(w: torch.Tensor, scheme: QuantScheme) -> bool:
    """Whether :func:`fake_quantize` runs for this weight and scheme (else the caller takes the eager path)."""
    if w.device.type != "cuda" or w.dim() != 2 or os.environ.get("HOLDALL_KERNELS", "1").strip() == "0":
        return False
    if scheme.dtype != "int" or scheme.granularity != "group" or scheme.group_size > MAX_GROUP:
        return False
    if scheme.torch_scale_dtype not in _SCALE_CODES or w.numel() >= 2**31:
        return False
    return _load() is not None


def fake_quantize(
    w: torch.Tensor,
    scheme: QuantScheme,
    s: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    flag: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q(clamp(w [out, in] · s [in], ±max_val [out, G])) / s`` as ``out_dtype``; call only where :func:`usable`.

    ``s`` None: no column scale; ``max_val`` None: no clipping. A group whose scale is not finite (weights
    overflowing an fp16 ``scale_dtype``) sets ``flag[0]`` to 1 (an int32 tensor the caller zeroed), so that the
    caller can tell without another pass over the output."""
    kernel = _load()
    import triton

    w = w.contiguous().float()
    n_out, n_in = w.shape
    g = scheme.group_size
    n_groups = -(-n_in // g)
    out = torch.empty(n_out, n_in, dtype=out_dtype, device=w.device)
    # no scale: ones (x 1 and / 1 are exact); no clip: +inf limits. One compiled kernel serves all four cases,
    # where constexpr switches would compile (~0.3 s each) on the first layer.
    s = torch.ones(n_in, device=w.device) if s is None else s.contiguous().float()
    if max_val is None:
        max_val = torch.full((n_out, n_groups), float("inf"), device=w.device)
    max_val = max_val.contiguous().float()
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=w.device)
    scale_dtype = scheme.torch_scale_dtype
    maxq = 2**scheme.bits - 1
    block_g = triton.next_power_of_2(g)
    block_r = max(1, min(64, 4096 // block_g))
    grid = (triton.cdiv(n_out, block_r), n_groups)
    kernel[grid](
        w, s, max_val, out, flag, n_out, n_in, g, n_groups, float(maxq),
        _reciprocal(maxq / 2 if scheme.symmetric else maxq), float(torch.finfo(scale_dtype).tiny),
        SYMMETRIC=scheme.symmetric, SCALE_DTYPE=_SCALE_CODES[scale_dtype], BLOCK_R=block_r, BLOCK_G=block_g,
        num_warps=4,
    )
    return out


@functools.lru_cache(maxsize=None)
def _reciprocal(divisor: float) -> float:
    """``1 / divisor`` rounded to float32, as torch's CUDA division by a Python number computes it (its
    ``BinaryDivTrueKernel`` multiplies by the float32 reciprocal); exact in the float the kernel receives."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(divisor, dtype=torch.float32))


def _load():
    global _kernel
    if _kernel is not None:
        return _kernel or None
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        _kernel = False  # remembered: the eager path serves
        return None

    # The row and group counts are not specialized on: each distinct (divisible by 16, == 1) pattern would compile
    # the kernel again, and a layer's consumers (4096 x 4096, 11008 x 4096, 4096 x 11008, ...) cover several.
    # The row length and group size are (both multiples of 16 in every model we know): knowing that, the
    # compiler proves each row's group contiguous and aligned, and loads/stores it 16 bytes at a time.
    @triton.jit(do_not_specialize=["R", "n_groups"])
    def fake_quant_kernel(
        W, S, CLIP, OUT, FLAG, R, N, G, n_groups, maxq, inv_range, tiny,
        SYMMETRIC: tl.constexpr, SCALE_DTYPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        # one program: rows [r0, r0 + BLOCK_R) x the columns of group gi; W, OUT [R, N] row-major, S [N],
        # CLIP [R, n_groups]
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        gi = tl.program_id(1)
        cols = gi * G + tl.arange(0, BLOCK_G)
        rmask = rows < R
        cmask = (tl.arange(0, BLOCK_G) < G) & (cols < N)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        w = tl.load(W + offs, mask=mask, other=0.0)
        s = tl.load(S + cols, mask=cmask, other=1.0)
        w = w * s[None, :]
        limit = tl.load(CLIP + rows * n_groups + gi, mask=rmask, other=0.0)[:, None]
        w = tl.maximum(tl.minimum(w, limit), -limit)
        if SYMMETRIC:
            scale = tl.max(tl.abs(w), axis=1) * inv_range
        else:
            lo = tl.minimum(tl.min(w, axis=1), 0.0)
            scale = (tl.maximum(tl.max(w, axis=1), 0.0) - lo) * inv_range
        if SCALE_DTYPE == 1:
            scale = scale.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        elif SCALE_DTYPE == 2:
            scale = scale.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        bad = tl.max(((scale != scale) | (tl.abs(scale) == float("inf"))).to(tl.int32), axis=0)
        if bad > 0:
            tl.store(FLAG, 1)
        scale = tl.where(scale == 0.0, tiny, scale)
        if SYMMETRIC:
            zero = maxq / 2 + 0.5  # 2**(bits - 1)
            zero = tl.zeros_like(scale) + zero
        else:
            zero = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(-lo, scale)), 0.0), maxq)
        q = libdevice.rint(tl.math.div_rn(w, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        y = (q - zero[:, None]) * scale[:, None]
        y = tl.math.div_rn(y, s[None, :])
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)

    _kernel = fake_quant_kernel
    return _kernel
