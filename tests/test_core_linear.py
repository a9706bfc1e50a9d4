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

    before = backends.available_backends()  # on a GPU machine an earlier CUDA forward registered the kernels
    backends.register_backend("test-doubled", doubled, supports=lambda lay, inp: inp.shape[0] == 2, priority=1000)
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
    assert backends.available_backends() == before and before[-1] == "reference"
    assert torch.equal(layer(x), reference)
    with pytest.raises(ConfigError, match="cannot be removed"):
        backends.unregister_backend("reference")
    with pytest.raises(ConfigError, match="no backend"):
        backends.unregister_backend("nope")


STACKABLE = [
    QuantScheme(group_size=32),
    QuantScheme(group_size=32, symmetric=False),
    QuantScheme(bits=8, granularity="channel", symmetric=False),
    QuantScheme(dtype="nf4", group_size=32),
    QuantScheme(dtype="fp4", group_size=64),
]


@pytest.mark.parametrize("scheme", [None, *STACKABLE], ids=lambda s: "float" if s is None else s.label)
def test_stacked_layer_computes_every_layer_and_shares_their_storage(scheme):
    from holdall.core.linear import stack_outputs

    floats = [make_linear(128, 40, bias=True, seed=1), make_linear(128, 24, bias=False, seed=2),
              make_linear(128, 64, bias=True, seed=3)]
    layers = floats if scheme is None else [QuantLinear.from_linear(f, scheme) for f in floats]
    x = torch.randn(3, 128)
    before = [layer(x) for layer in layers]
    weights = [layer.weight.detach().clone() if scheme is None else layer.dequantize_weight() for layer in layers]
    stacked = stack_outputs(layers)
    torch.testing.assert_close(stacked(x), torch.cat(before, -1), rtol=1e-5, atol=1e-5)
    for layer, want, weight in zip(layers, before, weights):  # the layers compute what they did ...
        assert torch.equal(layer(x), want)
        got = layer.weight if scheme is None else layer.dequantize_weight()
        assert torch.equal(got, weight)
        tensors = [layer.weight] if scheme is None else [layer._buffers[n] for n in layer._weight_names]
        owners = [stacked.weight] if scheme is None else [stacked._buffers[n] for n in layer._weight_names]
        for t, owner in zip(tensors, owners):  # ... from views of the stacked weight: no memory added
            assert t.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()
    assert not stacked.bias.requires_grad and torch.equal(stacked.bias[40:64], torch.zeros(24))
    again = stack_outputs(layers)  # stacking stacked layers again reuses their storage: no second copy
    owners_again = [again.weight] if scheme is None else [again._buffers[n] for n in layers[0]._weight_names]
    for first_owner, owner in zip([stacked.weight] if scheme is None else
                                  [stacked._buffers[n] for n in layers[0]._weight_names], owners_again):
        assert owner.data_ptr() == first_owner.data_ptr() and torch.equal(owner, first_owner)
    torch.testing.assert_close(again(x), torch.cat(before, -1), rtol=1e-5, atol=1e-5)


def test_layers_that_cannot_be_stacked_say_why():
    from holdall.core.linear import stack_outputs, why_not_stackable

    a, b = make_linear(96, 40), make_linear(96, 24)
    cases = [
        ([QuantLinear.from_linear(a, QuantScheme(dtype="nf4", group_size=32, double_quant=True)),
          QuantLinear.from_linear(b, QuantScheme(dtype="nf4", group_size=32, double_quant=True))], "double-quant"),
        ([QuantLinear.from_linear(a, QuantScheme(granularity="tensor")),
          QuantLinear.from_linear(b, QuantScheme(granularity="tensor"))], "output rows"),
        ([QuantLinear.from_linear(a, QuantScheme(group_size=32)),
          QuantLinear.from_linear(b, QuantScheme(group_size=64))], "differ"),
        ([a, make_linear(64, 24)], "differ"),
        ([a, QuantLinear.from_linear(b, QuantScheme(group_size=32))], "mixed"),
        ([a], "fewer"),
    ]
    for layers, reason in cases:
        assert reason in why_not_stackable(layers)
        with pytest.raises(ConfigError, match="cannot stack"):
            stack_outputs(layers)
