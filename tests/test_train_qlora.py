"""Training through a frozen quantized base: fast dequantization, the no-saved-weight autograd path, QLoRA prep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from holdall.algorithms import QuantConfig, quantize
from holdall.core import backends
from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.training.qlora import enable_gradient_checkpointing, prepare_model
from holdall.tuners.lora import LoraConfig, add_lora

SCHEMES = {
    "nf4-dq": QuantScheme(dtype="nf4", group_size=64, double_quant=True),
    "nf4": QuantScheme(dtype="nf4", group_size=64),
    "fp4": QuantScheme(dtype="fp4", group_size=64),
    "nf4-partial-block": QuantScheme(dtype="nf4", group_size=128),  # 96 * 40 is not a multiple of 128
    "int4-g128-sym": QuantScheme(bits=4, group_size=128),  # 96 = partial group
    "int4-g32-asym": QuantScheme(bits=4, group_size=32, symmetric=False),
    "int4-g64-dq": QuantScheme(bits=4, group_size=64, double_quant=True),
    "int4-channel": QuantScheme(bits=4, granularity="channel"),
    "int3-g64": QuantScheme(bits=3, group_size=64),  # general path
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(scheme: QuantScheme, out_features: int = 40, in_features: int = 96, bias: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), scheme)


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_dequantize_is_bit_identical(name, dtype):
    layer = _layer(SCHEMES[name])
    assert torch.equal(backends.dequantize_for_compute(layer, dtype), layer.dequantize_weight(dtype))


@pytest.mark.parametrize("name", ["nf4-dq", "int4-g128-sym", "int4-g32-asym"])
def test_gradients_through_quantized_base_match_float_reference(name):
    """d(loss)/dx and d(loss)/d(bias) through QuantLinear == through nn.Linear holding the dequantized weight."""
    layer = _layer(SCHEMES[name])
    ref = nn.Linear(96, 40)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize_weight(torch.float32))
        ref.bias.copy_(layer.bias)
    ref.weight.requires_grad_(False)
    x = torch.randn(3, 5, 96)
    xq, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (layer(xq) ** 2).sum().backward()
    (ref(xr) ** 2).sum().backward()
    torch.testing.assert_close(xq.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_no_float_weight_is_saved_for_backward():
    layer = _layer(SCHEMES["nf4-dq"], out_features=48, in_features=64)
    layer.bias.requires_grad_(False)
    x = torch.randn(7, 64, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (48, 64) not in shapes and (64, 48) not in shapes, shapes
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_lora_gradient_through_nf4_equals_float_model_of_dequantized_weights():
    """QLoRA's promise: the adapter sees exactly the gradient it would on the dequantized float model."""
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0)
    quant = make_tiny_llama()
    quantize(quant, QuantConfig.for_method("nf4", double_quant=True), progress=False)
    ref = make_tiny_llama()
    with torch.no_grad():  # the float reference holds the dequantized weights
        for name, module in quant.named_modules():
            if isinstance(module, QuantLinear):
                ref.get_submodule(name).weight.copy_(module.dequantize_weight(torch.float32))
    for model in (quant, ref):
        torch.manual_seed(1)
        add_lora(model, cfg)
        with torch.no_grad():  # a non-zero B so the adapter's A gets a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        model.train()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (quant, ref):
        model(input_ids=ids, labels=ids).loss.backward()
    grads_q = {n: p.grad for n, p in quant.named_parameters() if p.requires_grad}
    grads_r = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_r.keys() and grads_q
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def _qlora_grads(use_reentrant: bool | None, autocast: bool) -> dict[str, torch.Tensor]:
    model = make_tiny_llama()
    torch.manual_seed(1)
    prepare_model(model, "qlora", LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    if use_reentrant is not None:
        enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    model.train()
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    plain = _qlora_grads(None, autocast=False)
    checkpointed = _qlora_grads(use_reentrant, autocast=False)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_autocast_bf16_trains_through_quantized_base():
    grads = _qlora_grads(False, autocast=True)
    ref = _qlora_grads(None, autocast=False)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        # bf16 compute: close to the float32 gradient, not equal
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.95, (name, float(cos))


def test_quantized_forward_under_autocast_dequantizes_to_the_autocast_dtype():
    layer = _layer(SCHEMES["nf4-dq"])
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16), layer.bias.bfloat16())
    assert torch.equal(y, expected)


def test_prepare_model_qlora_quantizes_and_keeps_norms_in_base_dtype():
    model = make_tiny_llama().to(torch.bfloat16)
    prepare_model(model, "qlora", LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7
    assert all(m.scheme.dtype == "nf4" and m.scheme.double_quant and m.scheme.group_size == 64 for m in quantized)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    frozen_float = [p.dtype for n, p in model.named_parameters() if not p.requires_grad]
    assert set(frozen_float) == {torch.bfloat16}  # norms, embeddings, lm_head not upcast
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_prepare_model_lora_refuses_a_quantized_base():
    from holdall.errors import ConfigError

    model = make_tiny_llama()
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    with pytest.raises(ConfigError, match="float base"):
        prepare_model(model, "lora", LoraConfig(r=4))
