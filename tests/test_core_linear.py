"""QuantLinear and the backend dispatch point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from holdall.core import backends
from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, CorruptFileError

SCHEMES = [
    QuantScheme(group_size=64),
    QuantScheme(bits=8, granularity="channel", symmetric=False),
    QuantScheme(bits=3, group_size=64, double_quant=True),
    QuantScheme(dtype="nf4", group_size=64, double_quant=True),
    QuantScheme(dtype="fp4", group_size=64),
]


def make_linear(in_f=96, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=str)
def test_forward_is_linear_of_dequantized_weight(scheme, dtype, lead):
    linear = make_linear()
    layer = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(*lead, 96).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, 40) and y.dtype == dtype
    expected = F.linear(x, layer.dequantize_weight(dtype), linear.bias.detach().to(dtype))
    assert torch.equal(y, expected)


@pytest.mark.parametrize("scheme, tol", [(SCHEMES[0], 0.15), (SCHEMES[1], 0.01), (SCHEMES[3], 0.15)],
                         ids=lambda v: v.label if isinstance(v, QuantScheme) else str(v))
def test_close_to_float_layer(scheme, tol):
    linear = make_linear(256, 64)
    layer = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(8, 256)
    with torch.no_grad():
        rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < tol


def test_state_dict_round_trip():
    for scheme in SCHEMES:
        layer = QuantLinear.from_linear(make_linear(), scheme)
        sd = layer.state_dict()
        assert set(sd) == {"bias", *layer.quantized_weight.tensors()}
        fresh = QuantLinear(96, 40, scheme)
        fresh.load_state_dict(sd)
        x = torch.randn(3, 96)
        assert torch.equal(fresh(x), layer(x))


def test_state_dict_with_wrong_dtype_is_refused():
    layer = QuantLinear.from_linear(make_linear(), QuantScheme(group_size=64))
    sd = layer.state_dict()
    sd["scale"] = sd["scale"].float()
    with pytest.raises(CorruptFileError, match="scale"):
        QuantLinear(96, 40, QuantScheme(group_size=64)).load_state_dict(sd)


def test_no_bias_and_reporting():
    layer = QuantLinear.from_linear(make_linear(128, 16, bias=False), QuantScheme())
    assert layer.bias is None
    assert "scheme=int4-g128-sym" in repr(layer) and "bias=False" in repr(layer)
    assert layer.bits_per_weight == 4.125
    assert layer.nbytes == layer.quantized_weight.nbytes == 16 * 64 + 16 * 2


def test_casting_the_module_keeps_the_stored_format():
    layer = QuantLinear.from_linear(make_linear(), QuantScheme(dtype="nf4", group_size=64, double_quant=True))
    before = {k: v.clone() for k, v in layer.quantized_weight.tensors().items()}
    layer = layer.to(torch.bfloat16)
    for name, tensor in layer.quantized_weight.tensors().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name])
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_matches_cpu():
    layer = QuantLinear.from_linear(make_linear(), QuantScheme(group_size=64))
    x = torch.randn(4, 96)
    cpu = layer(x)
    gpu = layer.to("cuda")
    assert all(t.is_cuda for t in gpu.quantized_weight.tensors().values())
    assert torch.allclose(gpu(x.cuda()).cpu(), cpu, atol=1e-5)


def test_wrong_input_width():
    layer = QuantLinear.from_linear(make_linear(), QuantScheme(group_size=64))
    with pytest.raises(ConfigError, match="last dimension 96"):
        layer(torch.randn(2, 95))


def test_constructor_validation():
    with pytest.raises(ConfigError, match="in_features"):
        QuantLinear(0, 4, QuantScheme())
    with pytest.raises(ConfigError, match="QuantScheme"):
        QuantLinear(4, 4, "int4")
    with pytest.raises(ConfigError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), QuantScheme())


def test_backend_registry_dispatch():
    layer = QuantLinear.from_linear(make_linear(), QuantScheme(group_size=64))
    x = torch.randn(2, 96)
    reference = layer(x)
    calls = []

    def doubled(lay, inp):
        calls.append(inp.shape)
        return 2 * backends.reference_forward(lay, inp)

    backends.register_backend("test-doubled", doubled, supports=lambda lay, inp: inp.shape[0] == 2, priority=10)
    try:
        assert backends.available_backends()[0] == "test-doubled"
        assert torch.equal(layer(x), 2 * reference)
        assert torch.equal(layer(x[:1]), backends.reference_forward(layer, x[:1]))  # not supported: reference
        assert calls == [torch.Size([2, 96])]
        with backends.use_backend("reference"):
            assert torch.equal(layer(x), reference)
        with pytest.raises(ConfigError, match="already registered"):
            backends.register_backend("test-doubled", doubled)
    finally:
        backends.unregister_backend("test-doubled")
    assert backends.available_backends() == ["reference"]
    assert torch.equal(layer(x), reference)
    with pytest.raises(ConfigError, match="cannot be removed"):
        backends.unregister_backend("reference")
    with pytest.raises(ConfigError, match="no backend"):
        backends.unregister_backend("nope")
