"""quantize(model, QuantConfig): tiny random Llamas, layer selection, config handling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_llama
from holdall.algorithms import QuantConfig, quantize, select_layers
from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError

pytest.importorskip("transformers")

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def kl(ref, out):
    """Mean KL(ref || out) per token, in nats."""
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean") / TOKENS.shape[1])


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


LINEARS_PER_LAYER = 7  # q k v o gate up down


@pytest.mark.parametrize(
    "hidden, config, min_corr, max_kl",
    [
        (64, QuantConfig(scheme=QuantScheme(bits=8, granularity="channel")), 0.9999, 1e-4),
        (64, QuantConfig(), 0.98, 0.05),
        (64, QuantConfig.for_method("nf4"), 0.98, 0.05),
        (64, QuantConfig.for_method("nf4", double_quant=True), 0.98, 0.05),
        (64, QuantConfig.for_method("fp4"), 0.97, 0.08),
        (96, QuantConfig.for_method("rtn", group_size=64, symmetric=False), 0.98, 0.05),
        (96, QuantConfig.for_method("rtn", bits=8, group_size=64), 0.9999, 1e-4),
    ],
    ids=lambda v: v.label if isinstance(v, QuantConfig) else None,
)
def test_quantized_llama_stays_close(hidden, config, min_corr, max_kl):
    model = make_tiny_llama(hidden=hidden)
    ref = logits(model)
    head_before = model.lm_head.weight.detach().clone()
    embed_before = model.model.embed_tokens.weight.detach().clone()
    quantize(model, config, progress=False)
    qlayers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == 2 * LINEARS_PER_LAYER
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head_before)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    out = logits(model)
    assert corr(out, ref) > min_corr
    assert kl(ref, out) < max_kl
    assert model.holdall_quant["config"] == config.to_dict()
    assert set(model.holdall_quant["layers"]) == set(qlayers)
    assert all(s == config.scheme.to_dict() for s in model.holdall_quant["layers"].values())


def test_int4_is_closer_than_int3_is_closer_than_int2():
    ref = logits(make_tiny_llama())
    kls = []
    for bits in (4, 3, 2):
        model = quantize(make_tiny_llama(), QuantConfig.for_method("rtn", bits=bits, group_size=32), progress=False)
        kls.append(kl(ref, logits(model)))
    assert kls[0] < kls[1] < kls[2]


def test_refuses_requantization_unless_forced():
    model = quantize(make_tiny_llama(), QuantConfig(exclude=("mlp",)), progress=False)
    assert len(model.holdall_quant["layers"]) == 2 * 4
    with pytest.raises(ConfigError, match="double rounding"):
        quantize(model, QuantConfig(), progress=False)
    quantize(model, QuantConfig.for_method("nf4"), progress=False, force=True)
    layers = model.holdall_quant["layers"]
    assert len(layers) == 2 * LINEARS_PER_LAYER
    assert layers["model.layers.0.mlp.up_proj"]["dtype"] == "nf4"
    assert layers["model.layers.0.self_attn.q_proj"]["dtype"] == "int"


def test_config_is_not_mutated():
    config = QuantConfig(targets=["q_proj", "v_proj"], exclude=["layers\\.1\\."])
    before = copy.deepcopy(config)
    scheme = config.scheme
    quantize(make_tiny_llama(), config, progress=False)
    assert config == before and config.scheme is scheme
    assert config.targets == ("q_proj", "v_proj")


def test_targets_and_exclude_select_by_regex():
    model = make_tiny_llama()
    names = select_layers(model, QuantConfig(targets=("q_proj", "v_proj"), exclude=(r"layers\.1\.",)))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    quantize(model, QuantConfig(targets="down_proj"), progress=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    # the head is never a default target, but an explicit regex may pick it
    assert "lm_head" not in select_layers(make_tiny_llama(), QuantConfig())
    assert select_layers(make_tiny_llama(), QuantConfig(targets=("lm_head",))) == ["lm_head"]


def test_tied_embeddings_model():
    model = make_tiny_llama(tie=True)
    ref = logits(model)
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert corr(logits(model), ref) > 0.98


def test_plain_module_without_output_embeddings():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    ref = model(x)
    quantize(model, QuantConfig(scheme=QuantScheme(bits=8, group_size=32)), progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert torch.allclose(model(x), ref, atol=0.02)


def test_progress_bar_runs(capsys):
    quantize(make_tiny_llama(layers=1), QuantConfig(), progress=True)
    assert "quantize rtn:int4-g128-sym" in capsys.readouterr().err


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: QuantConfig(method="no-such-method"), ["unknown quantization method", "rtn"]),
        (lambda: QuantConfig(method="nf4", scheme=QuantScheme()), ["nf4", "for_method"]),
        (lambda: QuantConfig(method="rtn", scheme=QuantScheme(dtype="nf4", group_size=64)), ["rtn", "int"]),
        (lambda: QuantConfig(targets=("(",)), ["not a valid regex"]),
        (lambda: QuantConfig(targets=()), ["selects no layer"]),
        (lambda: QuantConfig(exclude=(3,)), ["regex strings"]),
        (lambda: QuantConfig(scheme="int4"), ["QuantScheme"]),
        (lambda: QuantConfig.for_method("nf4", groupsize=64), ["groupsize", "group_size"]),
        (lambda: QuantConfig.for_method("nf4", bits=8), ["bits=4"]),
        (lambda: QuantConfig.from_dict({"method": "rtn", "bits": 4}), ["unknown QuantConfig field"]),
    ],
)
def test_bad_configs(build, words):
    with pytest.raises(ConfigError) as info:
        build()
    for word in words:
        assert word in str(info.value)


def test_no_matching_layer_and_bad_arguments():
    with pytest.raises(ConfigError, match="no layer matched.*q_proj"):
        quantize(make_tiny_llama(), QuantConfig(targets=("attention_dense",)), progress=False)
    with pytest.raises(ConfigError, match="QuantConfig"):
        quantize(make_tiny_llama(), {"method": "rtn"}, progress=False)
    with pytest.raises(ConfigError, match="nn.Module"):
        quantize("model", QuantConfig(), progress=False)


def test_config_defaults_and_round_trip():
    assert QuantConfig().scheme == QuantScheme()
    assert QuantConfig(method="nf4").scheme == QuantScheme(dtype="nf4", group_size=64)
    config = QuantConfig.for_method("nf4", double_quant=True, targets=["proj"], exclude="lm_head")
    assert config.scheme.label == "nf4-b64-dq" and config.label == "nf4:nf4-b64-dq"
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({"method": "fp4"}).scheme.dtype == "fp4"


def test_dequantize_turns_quant_linears_back_into_linears_with_the_same_function():
    from holdall.algorithms import dequantize
    from holdall.core.linear import QuantLinear

    model = make_tiny_llama()
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
    dequantize(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not hasattr(model, "holdall_quant")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)  # a float model again
