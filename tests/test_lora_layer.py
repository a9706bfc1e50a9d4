"""LoraLinear against plain-torch formulas: math, init, scaling, dropout, merge, quantized bases, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError
from holdall.tuners.lora import LoraConfig
from holdall.tuners.lora.layer import LoraLinear

IN, OUT, R = 48, 40, 4


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _randomize_b(layer: LoraLinear, name: str = "default", seed: int = 1) -> None:
    # B starts at zero; tests of the update itself need a non-zero B.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g))


def _reference(x, W, b, A, B, s):
    """The LoRA formula written out: x W^T + b + s * x A^T B^T."""
    out = x @ W.T + (b if b is not None else 0)
    return out + s * (x @ A.T) @ B.T


def _layer(base, alpha=8.0, r=R, rslora=False, dropout=0.0, name="default"):
    layer = LoraLinear(base)
    layer.add_adapter(name, r, alpha, dropout=dropout, use_rslora=rslora)
    layer.set_active([name])
    return layer


def test_forward_matches_plain_formula():
    base = _linear()
    layer = _layer(base)
    _randomize_b(layer)
    x = torch.randn(3, 5, IN)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = _reference(x, base.weight, base.bias, A, B, 8.0 / R)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_init_b_zero_gives_base_output_and_a_is_kaiming_uniform():
    torch.manual_seed(3)
    base = nn.Linear(1024, 64)
    layer = _layer(base, r=64)
    x = torch.randn(2, 1024)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(64, 64))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    A = layer.lora_A["default"].weight  # [64, 1024]
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) * fan_in))
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.95 * bound  # fills the interval, not a narrower one
    # a uniform distribution on [-b, b] has std b/√3
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(A.mean().item()) < 0.05 * bound


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_alpha_over_r_and_rslora(rslora):
    layer = _layer(_linear(), alpha=16.0, r=4, rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(8.0 if rslora else 4.0)
    assert LoraConfig(r=4, alpha=16, use_rslora=rslora).scaling == pytest.approx(8.0 if rslora else 4.0)
    _randomize_b(layer)
    x = torch.randn(4, IN)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = layer(x) - layer.base_layer(x)
    s = 16 / math.sqrt(4) if rslora else 16 / 4
    torch.testing.assert_close(delta, s * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_and_only_on_the_adapter_path():
    base = _linear()
    layer = _layer(base, dropout=0.5)
    _randomize_b(layer)
    x = torch.randn(8, IN)
    layer.eval()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), _reference(x, base.weight, base.bias, A, B, 2.0), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, base(x) + 2.0 * (dropped @ A.T) @ B.T, rtol=1e-5, atol=1e-5)


def test_two_active_adapters_add_up():
    base = _linear()
    layer = LoraLinear(base)
    layer.add_adapter("a", 4, 8.0)
    layer.add_adapter("b", 2, 2.0)
    _randomize_b(layer, "a", 1)
    _randomize_b(layer, "b", 2)
    x = torch.randn(5, IN)
    layer.set_active(["a", "b"])
    both = layer(x)
    da = 2.0 * (x @ layer.lora_A["a"].weight.T) @ layer.lora_B["a"].weight.T
    db = 1.0 * (x @ layer.lora_A["b"].weight.T) @ layer.lora_B["b"].weight.T
    torch.testing.assert_close(both, base(x) + da + db, rtol=1e-5, atol=1e-5)
    layer.set_active(["b"])
    torch.testing.assert_close(layer(x), base(x) + db, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_are_exact_on_float_linear():
    base = _linear()
    original = base.weight.detach().clone()
    layer = _layer(base)
    _randomize_b(layer)
    x = torch.randn(6, IN)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    expected_w = original + (8.0 / R) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(base.weight, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=1e-5)  # not added twice
    layer.unmerge()
    assert layer.merged_adapters == []
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(dtype="int", bits=4, group_size=16), QuantScheme(dtype="nf4", group_size=64)],
    ids=["int4", "nf4"],
)
def test_quantized_base_forward_is_base_plus_delta(scheme):
    qbase = QuantLinear.from_linear(_linear(), scheme)
    layer = _layer(qbase)
    x = torch.randn(2, 3, IN)
    torch.testing.assert_close(layer(x), qbase(x), rtol=0, atol=0)  # step 0
    _randomize_b(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = qbase.dequantize_weight(torch.float32)
    expected = _reference(x, W, qbase.bias, A, B, 8.0 / R)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="merge into the float base instead"):
        layer.merge()


def test_requantize_merge_is_explicit_and_close():
    scheme = QuantScheme(dtype="int", bits=8, group_size=16)
    qbase = QuantLinear.from_linear(_linear(), scheme)
    layer = _layer(qbase)
    _randomize_b(layer)
    with pytest.raises(ConfigError, match="rounds twice"):
        layer.merged_base()
    merged = layer.merged_base(requantize=True)
    assert isinstance(merged, QuantLinear) and merged.scheme == scheme
    x = torch.randn(4, IN)
    # int8 re-rounding of W + delta: close to the unmerged output, not bit-equal
    err = (merged(x) - layer(x)).abs().max() / layer(x).abs().max()
    assert err < 0.02


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_gradients_reach_only_adapter_weights(quantized):
    base = _linear()
    for p in base.parameters():
        p.requires_grad_(False)
    if quantized:
        base = QuantLinear.from_linear(base, QuantScheme(dtype="nf4", group_size=64))
        base.bias.requires_grad_(False)
    layer = _layer(base)
    x = torch.randn(3, IN, requires_grad=True)
    layer(x).pow(2).sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert B.grad is not None and B.grad.abs().sum() > 0  # dL/dB = s * g^T (x A^T) ≠ 0
    assert A.grad is not None and torch.equal(A.grad, torch.zeros_like(A))  # dL/dA ∝ B = 0 at step 0
    assert x.grad is not None  # the input still gets its gradient (earlier layers' adapters need it)
    grads = [n for n, p in layer.named_parameters() if p.grad is not None]
    assert sorted(grads) == ["lora_A.default.weight", "lora_B.default.weight"]


def test_gradient_matches_autograd_of_the_formula():
    base = _linear()
    layer = _layer(base)
    _randomize_b(layer)
    x = torch.randn(2, 7, IN)
    layer(x).sin().sum().backward()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    _reference(x, base.weight.detach(), base.bias.detach(), A, B, 8.0 / R).sin().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, rtol=1e-4, atol=1e-5)


def test_half_input_uses_fp32_adapter_and_returns_input_dtype():
    base = _linear().to(torch.bfloat16)
    layer = _layer(base)
    _randomize_b(layer)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x).float() + 2.0 * (x.float() @ A.T) @ B.T
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_non_linear_base_and_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="nn.Linear or holdall QuantLinear"):
        LoraLinear(nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="ambiguous"):
        LoraConfig(targets="q_proj")
    with pytest.raises(ConfigError, match="bias"):
        LoraConfig(bias="some")
    assert LoraConfig(targets=["q_proj"]).targets == ("q_proj",)
    cfg = LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"), modules_to_save=("lm_head",))
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
