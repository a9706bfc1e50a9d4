"""The CPU int4 backend (``holdall.kernels.cpu_int4``: torch's ``_weight_int4pack_mm_for_cpu``) against the
plain-torch reference, and the cases it must leave to the reference."""

from __future__ import annotations

import pytest
import torch

from holdall.core import backends
from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.kernels import cpu_int4

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this torch build has no CPU int4 kernels")


@pytest.fixture(autouse=True)
def _enabled():
    """Opt-in: registered for each test here, removed after (the default CPU path is the reference)."""
    with cpu_int4.enabled():
        yield


def _layer(out_f, in_f, scheme, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return QuantLinear.from_linear(linear, scheme).to(torch.bfloat16)


def _reference(layer, x):
    with backends.use_backend(backends.REFERENCE):
        return layer(x)


SCHEMES = {
    "sym-g64": QuantScheme(group_size=64),
    "asym-g32": QuantScheme(group_size=32, symmetric=False),
    "sym-g128-dq": QuantScheme(group_size=128, double_quant=True),
    "asym-channel": QuantScheme(granularity="channel", symmetric=False),
    "sym-tensor": QuantScheme(granularity="tensor"),
    "asym-g256": QuantScheme(group_size=256, symmetric=False),
}


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_matches_the_reference(name, rows):
    layer = _layer(96, 512, SCHEMES[name])
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    assert backends.select_backend(layer, x) is cpu_int4.forward
    with torch.no_grad():
        got, want = layer(x), _reference(layer, x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # bf16 output, the kernel's own accumulation order and bf16 scales: within a few bf16 steps of the output
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 6e-3, err
    x3 = x.reshape(rows, 1, 512)
    with torch.no_grad():
        assert torch.equal(layer(x3).reshape(rows, -1), got)  # leading dims are kept


def test_what_it_leaves_to_the_reference():
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    partial = _layer(64, 576, QuantScheme(group_size=128))  # 4.5 groups: SmolLM2's partial last group
    assert cpu_int4.why_unsupported(partial) and backends.select_backend(partial, x) is not cpu_int4.forward
    nf4 = _layer(64, 512, QuantScheme(dtype="nf4", group_size=64))
    assert "4-bit integer" in cpu_int4.why_unsupported(nf4)
    layer = _layer(64, 512, QuantScheme(group_size=64))
    assert backends.select_backend(layer, torch.randn(1, 512)) is not cpu_int4.forward  # fp32 compute
    assert backends.select_backend(layer, torch.randn(65, 512, dtype=torch.bfloat16)) is not cpu_int4.forward
    needs_grad = torch.randn(1, 512, dtype=torch.bfloat16, requires_grad=True)
    assert backends.select_backend(layer, needs_grad) is not cpu_int4.forward  # training: the reference's backward


def test_bias_gradient_flows_and_a_changed_buffer_is_seen():
    layer = _layer(64, 512, QuantScheme(group_size=64))
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    assert backends.select_backend(layer, x) is cpu_int4.forward
    layer(x).float().sum().backward()
    assert torch.equal(layer.bias.grad, torch.full_like(layer.bias, 2.0))
    with torch.no_grad():
        before = layer(x)
        other = _layer(64, 512, QuantScheme(group_size=64), seed=1)
        layer.load_state_dict(other.state_dict())  # in-place copies into the same buffers
        after = layer(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, other(x))


def test_it_is_opt_in():
    layer = _layer(64, 512, QuantScheme(group_size=64))
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    cpu_int4.disable()  # the fixture's registration
    assert cpu_int4.BACKEND not in backends.available_backends()
    assert backends.select_backend(layer, x) is not cpu_int4.forward
    with cpu_int4.enabled() as on:
        assert on and backends.select_backend(layer, x) is cpu_int4.forward
    assert cpu_int4.BACKEND not in backends.available_backends()
    cpu_int4.enable()  # back for the fixture's exit

