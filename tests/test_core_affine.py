"""Affine int quantization against a plain per-group loop written independently here."""

from __future__ import annotations

import pytest
import torch

from holdall.core import affine
from holdall.core.qtensor import QuantizedTensor
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, DataError

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def reference_int(w: torch.Tensor, scheme: QuantScheme):
    """Contract formulas, one group at a time: returns (codes [out, in], scale [R, G] float32, zero [R, G] or None)."""
    out_f, in_f = w.shape
    maxq = 2**scheme.bits - 1
    if scheme.granularity == "tensor":
        spans = [(slice(None), slice(None))]
        rows, cols = 1, 1
    elif scheme.granularity == "channel":
        spans = [(slice(r, r + 1), slice(None)) for r in range(out_f)]
        rows, cols = out_f, 1
    else:
        g = scheme.group_size
        cols = -(-in_f // g)
        spans = [(slice(r, r + 1), slice(c * g, min((c + 1) * g, in_f))) for r in range(out_f) for c in range(cols)]
        rows = out_f
    codes = torch.empty(out_f, in_f)
    scales, zeros = [], []
    for rs, cs in spans:
        x = w[rs, cs].float()
        if scheme.symmetric:
            s = x.abs().max() / ((2**scheme.bits - 1) / 2)
        else:
            s = (x.max().clamp(min=0) - x.min().clamp(max=0)) / maxq
        s = s.to(SCALE_DTYPES[scheme.scale_dtype])
        if s == 0:
            s = torch.tensor(torch.finfo(s.dtype).tiny, dtype=s.dtype)
        s = s.float()
        z = 2 ** (scheme.bits - 1) if scheme.symmetric else torch.round(-x.min().clamp(max=0) / s).clamp(0, maxq)
        codes[rs, cs] = torch.clamp(torch.round(x / s) + z, 0, maxq)
        scales.append(s)
        zeros.append(torch.as_tensor(z, dtype=torch.float32))
    zero = None if scheme.symmetric else torch.stack(zeros).reshape(rows, cols)
    return codes.to(torch.uint8), torch.stack(scales).reshape(rows, cols), zero


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(20 * torch.log10(x.norm() / (x - y).norm()))


SCHEMES = [
    QuantScheme(bits=b, granularity=gr, group_size=gs, symmetric=sym, scale_dtype=sd)
    for b, gr, gs, sym, sd in [
        (4, "group", 128, True, "float16"),
        (4, "group", 128, False, "float16"),
        (3, "group", 128, True, "bfloat16"),
        (2, "group", 64, False, "float32"),
        (5, "group", 32, True, "float16"),
        (6, "group", 100, False, "float16"),
        (8, "channel", 128, True, "float16"),
        (8, "channel", 128, False, "bfloat16"),
        (4, "tensor", 128, True, "float32"),
        (3, "tensor", 128, False, "float16"),
    ]
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("shape", [(8, 576), (5, 96), (3, 7)])
def test_matches_reference(scheme, shape):
    gen = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=gen) * 0.02
    w[0, 0] = 0.3  # an outlier
    scale, zero = affine.choose_qparams(w, scheme)
    codes = affine.quantize_affine(w, scale, zero, scheme)
    ref_codes, ref_scale, ref_zero = reference_int(w, scheme)
    assert scale.dtype == SCALE_DTYPES[scheme.scale_dtype]
    assert torch.equal(scale.float(), ref_scale)
    if scheme.symmetric:
        assert zero is None
    else:
        assert torch.equal(zero.float(), ref_zero)
    assert torch.equal(codes, ref_codes)
    # dequantization is (q - zero) * scale, and every weight is within half a step of its code
    deq = affine.dequantize_affine(codes, scale, zero, scheme)
    z = 2 ** (scheme.bits - 1) if scheme.symmetric else affine.expand_qparams(ref_zero, shape, scheme)
    s = affine.expand_qparams(ref_scale, shape, scheme)
    assert torch.equal(deq, (ref_codes.float() - z) * s)
    # within half a step of its code, plus what rounding the scale to scale_dtype can add at the range ends
    unit = torch.finfo(SCALE_DTYPES[scheme.scale_dtype]).eps
    bound = 0.5 * s * (1 + 1e-5) + 2**scheme.bits * unit * s + 1e-9
    assert bool(((w - deq).abs() <= bound).all())


def test_asymmetric_grid_round_trips_exactly():
    # weights already on an asymmetric grid with power-of-two scales: quantize -> dequantize is the identity
    gen = torch.Generator().manual_seed(0)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    codes = torch.randint(0, 16, (6, 96), generator=gen)
    codes[:, ::32] = 0  # every group spans the whole range, so its min/max pin the grid
    codes[:, 1::32] = 15
    zero = torch.randint(1, 15, (6, 3), generator=gen)
    scale = 2.0 ** -torch.randint(4, 9, (6, 3), generator=gen).float()
    w = (codes - zero.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)
    q = QuantizedTensor.from_float(w, scheme)
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize(
    "scheme, threshold",
    [
        (QuantScheme(bits=8, granularity="channel"), 40),
        (QuantScheme(bits=8, group_size=128), 40),
        (QuantScheme(bits=6, group_size=128), 30),
        (QuantScheme(bits=4, group_size=128), 18),
        (QuantScheme(bits=4, group_size=128, symmetric=False), 18),
        (QuantScheme(bits=4, group_size=128, double_quant=True), 18),
        (QuantScheme(bits=3, group_size=128), 11.5),
        (QuantScheme(bits=2, group_size=64, symmetric=False), 5),
    ],
    ids=lambda v: v.label if isinstance(v, QuantScheme) else str(v),
)
def test_sqnr_on_random_weights(scheme, threshold):
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(1)) * 0.02
    deq = QuantizedTensor.from_float(w, scheme).dequantize()
    assert sqnr_db(w, deq) > threshold


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_is_safe(symmetric):
    scheme = QuantScheme(bits=4, group_size=64, symmetric=symmetric)
    w = torch.randn(4, 192) * 0.02
    w[1, 64:128] = 0.0
    w[2] = 0.0
    w[3, 128:] = 1e-9  # underflows a float16 scale
    scale, zero = affine.choose_qparams(w, scheme)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = QuantizedTensor.from_float(w, scheme).dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[1, 64:128] == 0).all() and (deq[2] == 0).all()
    assert (deq[3, 128:].abs() <= 1e-9).all()


def test_rejects_non_finite_weights():
    w = torch.randn(4, 64)
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[2, 3] = bad
        with pytest.raises(DataError, match="NaN/Inf"):
            QuantizedTensor.from_float(w2, QuantScheme())
        with pytest.raises(DataError, match="NaN/Inf"):
            QuantizedTensor.from_float(w2, QuantScheme(dtype="nf4", group_size=64))


def test_scale_overflow_names_the_fix():
    w = torch.full((2, 8), 1e8)  # scale 1e8 / 127.5 overflows float16 (max 65504)
    with pytest.raises(ConfigError, match="scale_dtype='float32'"):
        QuantizedTensor.from_float(w, QuantScheme(bits=8, granularity="channel"))
    q = QuantizedTensor.from_float(w, QuantScheme(bits=8, granularity="channel", scale_dtype="float32"))
    assert torch.allclose(q.dequantize(), w, rtol=1e-2)


def test_int_schemes_need_2d():
    with pytest.raises(ConfigError, match="2-D"):
        QuantizedTensor.from_float(torch.randn(2, 3, 64), QuantScheme())


def test_scales_are_rounded_before_codes():
    # the stored (fp16) scale reproduces the stored codes: re-quantizing with it changes nothing
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    scheme = QuantScheme(bits=4, group_size=128, symmetric=False)
    scale, zero = affine.choose_qparams(w, scheme)
    codes = affine.quantize_affine(w, scale, zero, scheme)
    assert torch.equal(affine.quantize_affine(w, scale.float().half(), zero, scheme), codes)
    unrounded = (w.reshape(16, 2, 128).amax(-1).clamp(min=0) - w.reshape(16, 2, 128).amin(-1).clamp(max=0)) / 15
    assert not torch.equal(unrounded, scale.float())  # fp16 rounding really happened
