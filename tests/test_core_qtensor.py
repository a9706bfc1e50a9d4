"""QuantizedTensor: storage layout, true size, validation of stored tensors."""

from __future__ import annotations

import math

import pytest
import torch

from holdall.core.qtensor import QuantizedTensor, tensor_specs
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, CorruptFileError

SCHEMES = [
    QuantScheme(),
    QuantScheme(symmetric=False),
    QuantScheme(bits=3),
    QuantScheme(bits=5, group_size=64, symmetric=False, double_quant=True),
    QuantScheme(bits=8, granularity="channel", scale_dtype="bfloat16"),
    QuantScheme(bits=2, granularity="tensor", symmetric=False),
    QuantScheme(double_quant=True),
    QuantScheme(dtype="nf4", group_size=64),
    QuantScheme(dtype="nf4", group_size=64, double_quant=True),
    QuantScheme(dtype="fp4", group_size=64, double_quant=True),
]


def weight(shape=(256, 1024), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def bpw(scheme, shape=(256, 1024)):
    return QuantizedTensor.from_float(weight(shape), scheme).bits_per_weight


def test_bits_per_weight():
    assert bpw(QuantScheme()) == 4 + 16 / 128  # 4.125
    assert bpw(QuantScheme(symmetric=False)) == 4 + 16 / 128 + 4 / 128  # zeros packed at 4 bits
    assert bpw(QuantScheme(bits=3)) == 3 + 16 / 128
    assert bpw(QuantScheme(dtype="nf4", group_size=64)) == 4.5
    assert bpw(QuantScheme(dtype="nf4", group_size=64, double_quant=True)) == pytest.approx(4.127, abs=1e-3)
    assert bpw(QuantScheme(double_quant=True)) < bpw(QuantScheme())
    # the partial last group of SmolLM2's 576 columns costs a whole scale
    assert bpw(QuantScheme(), (64, 576)) == pytest.approx(4 + 16 * 5 / 576)
    for scheme in (QuantScheme(), QuantScheme(symmetric=False)):
        assert bpw(scheme, (64, 576)) <= 4.3


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("shape", [(16, 576), (7, 33)])
def test_layout_and_round_trip_through_tensors(scheme, shape):
    q = QuantizedTensor.from_float(weight(shape), scheme)
    tensors = q.tensors()
    empty = QuantizedTensor.empty_tensors(shape, scheme)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in empty.items()
    }
    assert q.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert q.bits_per_weight == 8 * q.nbytes / math.prod(shape)
    again = QuantizedTensor.from_tensors(tensors, shape, scheme)
    assert torch.equal(again.dequantize(), q.dequantize())
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert q.dequantize().shape == shape


def test_expected_names():
    assert set(tensor_specs((8, 128), QuantScheme())) == {"qdata", "scale"}
    assert set(tensor_specs((8, 128), QuantScheme(symmetric=False))) == {"qdata", "scale", "zero"}
    assert set(tensor_specs((8, 128), QuantScheme(dtype="nf4", double_quant=True))) == {
        "qdata", "scale", "scale_absmax", "scale_offset"
    }
    assert tensor_specs((8, 128), QuantScheme(dtype="nf4", group_size=64))["qdata"] == ((512, 1), torch.uint8)


def test_from_tensors_rejects_inconsistent_data():
    scheme = QuantScheme(symmetric=False)
    tensors = QuantizedTensor.from_float(weight((8, 256)), scheme).tensors()
    missing = {k: v for k, v in tensors.items() if k != "zero"}
    with pytest.raises(CorruptFileError, match="missing tensors \\['zero'\\]"):
        QuantizedTensor.from_tensors(missing, (8, 256), scheme)
    with pytest.raises(CorruptFileError, match="'scale' is torch.float32"):
        QuantizedTensor.from_tensors({**tensors, "scale": tensors["scale"].float()}, (8, 256), scheme)
    with pytest.raises(CorruptFileError, match="'qdata'"):
        QuantizedTensor.from_tensors(tensors, (8, 512), scheme)
    with pytest.raises(CorruptFileError, match="unexpected tensors \\['g_idx'\\]"):
        QuantizedTensor.from_tensors({**tensors, "g_idx": torch.zeros(3)}, (8, 256), scheme)


def test_double_quantized_int_scales_stay_close():
    w = weight((64, 1024))
    plain = QuantizedTensor.from_float(w, QuantScheme())
    dq = QuantizedTensor.from_float(w, QuantScheme(double_quant=True))
    assert dq.tensors()["scale"].dtype == torch.uint8
    rel = (dq.scales() - plain.scales()).abs() / plain.scales()
    assert float(rel.max()) < 0.05
    err_plain = (w - plain.dequantize()).norm()
    err_dq = (w - dq.dequantize()).norm()
    assert err_dq < 1.05 * err_plain


def test_bad_inputs():
    with pytest.raises(ConfigError, match="empty"):
        QuantizedTensor.from_float(torch.zeros(0, 4), QuantScheme(dtype="nf4"))
    with pytest.raises(ConfigError, match="QuantScheme"):
        QuantizedTensor.from_float(weight(), "int4")
    with pytest.raises(Exception, match="floating-point"):
        QuantizedTensor.from_float(torch.ones(4, 4, dtype=torch.int32), QuantScheme())


def test_to_keeps_dtypes_and_repr():
    q = QuantizedTensor.from_float(weight((4, 128)), QuantScheme(dtype="nf4", group_size=64, double_quant=True))
    moved = q.to("cpu")
    assert {k: v.dtype for k, v in moved.tensors().items()} == {k: v.dtype for k, v in q.tensors().items()}
    assert "nf4-b64-dq" in repr(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_cuda_produces_the_same_bytes_as_cpu(scheme):
    w = weight((64, 576))
    on_gpu = QuantizedTensor.from_float(w.cuda(), scheme).tensors()
    on_cpu = QuantizedTensor.from_float(w, scheme).tensors()
    assert all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_cpu)
