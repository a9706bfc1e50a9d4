"""holdall's NF4 QuantLinear against bitsandbytes' own Linear4bit: same bytes, same outputs."""

from __future__ import annotations

import pytest
import torch

from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_matches_bitsandbytes_linear4bit(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 320, bias=True)
    ours = QuantLinear.from_linear(linear, QuantScheme(dtype="nf4", bits=4, group_size=64, double_quant=double_quant))
    theirs = bnb.nn.Linear4bit(192, 320, bias=True, compute_dtype=torch.float32,
                               compress_statistics=double_quant, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                      compress_statistics=double_quant, quant_type="nf4")
    theirs.bias = torch.nn.Parameter(linear.bias.data.clone())
    theirs = theirs.to("cpu")  # quantizes
    # Training mode: bitsandbytes' CPU backend repacks weights for a bf16 kernel when switched to eval mode.
    theirs.train()
    assert torch.equal(ours.qdata.flatten(), theirs.weight.data.flatten())
    x = torch.randn(3, 7, 192)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
