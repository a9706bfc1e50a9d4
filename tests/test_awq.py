"""AWQ: the formulas against plain torch, the fold (the scaled float model is the same function), the searches
never doing worse than what they start from, grouped-query attention, bad inputs, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from holdall.algorithms import AWQConfig, CalibrationConfig, QuantConfig, awq_scale_model, quantize
from holdall.algorithms.awq import (
    AWQQuantizer,
    awq_scales,
    clip_search,
    fake_quantize,
    fold_inverse_scale,
    scaled_fake_quantize,
    weight_mean,
)
from holdall.core.linear import QuantLinear
from holdall.core.qtensor import QuantizedTensor
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, DataError, UnsupportedModelError
from holdall.models.families import get_family

CALIB = torch.randint(0, 128, (6, 40), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def make_tiny_qwen2(hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def randomize_norms(model, seed: int = 0):
    """Random positive norm weights (init is all ones), so the fold is checked against a non-trivial weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def awq_config(group_size: int = 32, **options) -> QuantConfig:
    return QuantConfig.for_method(
        "awq", group_size=group_size, options=AWQConfig(**options),
        calibration=CalibrationConfig(n_samples=CALIB.shape[0], seq_len=CALIB.shape[1]),
    )


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


MODELS = {
    # hidden 96 with groups of 64: q/k/v/gate/up have a partial last group (96 = 64 + 32), down 160 = 2 x 64 + 32
    "llama-gqa": lambda: make_tiny_llama(hidden=96, layers=2, heads=4, kv_heads=2, intermediate=160),
    "llama-mha": lambda: make_tiny_llama(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=160),
    "qwen2-gqa-bias": lambda: make_tiny_qwen2(hidden=96),
}


# --- the formulas -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=32, symmetric=False), QuantScheme(bits=3, group_size=40),
     QuantScheme(bits=2, granularity="channel", symmetric=False), QuantScheme(bits=8, granularity="tensor"),
     QuantScheme(bits=5, group_size=64, scale_dtype="bfloat16")],
    ids=lambda s: s.label,
)
def test_fake_quantize_is_what_the_core_stores(scheme):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(0)) * 0.05
    w[:, 7] = 0
    w[3] = 0  # an all-zero row: the tiny-scale rule
    assert torch.equal(fake_quantize(w, scheme), QuantizedTensor.from_float(w, scheme).dequantize())


FUSED_SCHEMES = [
    QuantScheme(bits=4, group_size=128, symmetric=False), QuantScheme(bits=4, group_size=128),
    QuantScheme(bits=3, group_size=64), QuantScheme(bits=2, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=128, symmetric=False), QuantScheme(bits=5, group_size=40, scale_dtype="bfloat16"),
    QuantScheme(bits=4, group_size=256, scale_dtype="float32", symmetric=False),
]


def _scaled_case(device: str = "cpu"):
    """A [48, 300] weight (300 = 2 x 128 + a partial group, for every group size above), an all-zero row, a zero
    column, column scales over three decades, and per-(row, group) clip limits below the group max."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 300, generator=g) * 0.03
    w[5] = 0
    w[:, 11] = 0
    s = torch.exp(torch.randn(300, generator=g) * 1.5)
    return w.to(device), s.to(device), g


@pytest.mark.parametrize("scheme", FUSED_SCHEMES, ids=lambda s: s.label)
def test_scaled_fake_quantize_is_the_core_rounding_of_the_scaled_clipped_weight(scheme):
    """``Q(clip(w s)) / s`` against the core's stored layer of the scaled, clipped weight, divided back."""
    w, s, g = _scaled_case()
    n_groups = -(-w.shape[1] // scheme.group_size)
    limit = torch.rand(w.shape[0], n_groups, generator=g) * 0.1 + 0.02  # [out, G]
    ws = w * s
    per_col = limit.repeat_interleave(scheme.group_size, dim=1)[:, : w.shape[1]]
    clipped = torch.maximum(torch.minimum(ws, per_col), -per_col)
    ref = QuantizedTensor.from_float(clipped, scheme).dequantize() / s
    assert torch.equal(scaled_fake_quantize(w, scheme, s, limit), ref)
    assert torch.equal(scaled_fake_quantize(w, scheme), QuantizedTensor.from_float(w, scheme).dequantize())
    half = scaled_fake_quantize(w, scheme, s, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, (QuantizedTensor.from_float(ws, scheme).dequantize() / s).bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", FUSED_SCHEMES, ids=lambda s: s.label)
def test_fused_candidate_kernel_matches_the_eager_passes_bit_for_bit(scheme, monkeypatch):
    from holdall.algorithms import fake_quant_triton

    pytest.importorskip("triton")
    w, s, g = _scaled_case("cuda")
    n_groups = -(-w.shape[1] // scheme.group_size)
    limit = (torch.rand(w.shape[0], n_groups, generator=g) * 0.1 + 0.02).cuda()
    assert fake_quant_triton.usable(w, scheme)
    fused = [fake_quant_triton.fake_quantize(w, scheme, s, limit), fake_quant_triton.fake_quantize(w, scheme),
             fake_quant_triton.fake_quantize(w, scheme, s, out_dtype=torch.bfloat16)]
    monkeypatch.setenv("HOLDALL_KERNELS", "0")  # the eager passes, on the same GPU
    assert not fake_quant_triton.usable(w, scheme)
    eager = [scaled_fake_quantize(w, scheme, s, limit), scaled_fake_quantize(w, scheme),
             scaled_fake_quantize(w, scheme, s, out_dtype=torch.bfloat16)]
    for a, b in zip(fused, eager):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} values differ"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_candidate_overflowing_fp16_scales_raises_as_the_eager_path():
    pytest.importorskip("triton")
    w = torch.full((4, 128), 1e6, device="cuda")
    with pytest.raises(ConfigError, match="overflow float16 scales"):
        scaled_fake_quantize(w, QuantScheme(bits=4, group_size=128))


def test_weight_mean_and_scales_match_plain_torch():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 100, generator=g)
    scheme = QuantScheme(group_size=32)  # 100 = 3 x 32 + a partial group of 4
    ref = torch.zeros(100, dtype=torch.float64)
    for row in w.double():
        for start in range(0, 100, 32):
            part = row[start : start + 32].abs()
            ref[start : start + 32] += part / (part.max() + 1e-6)
    torch.testing.assert_close(weight_mean(w, scheme).double(), ref / 12, rtol=1e-6, atol=1e-7)
    x_mean = torch.rand(100, generator=g) * 3
    for alpha in (0.0, 0.35, 0.95):
        plain = (x_mean.double() ** alpha / (ref / 12) ** (1 - alpha)).float()  # ~ the duo formula, up to 1e-4 terms
        duo = awq_scales(x_mean, weight_mean(w, scheme), alpha, True)
        expected = (x_mean**alpha / (weight_mean(w, scheme) ** (1 - alpha) + 1e-4)).clamp(min=1e-4)
        torch.testing.assert_close(duo, expected / (expected.max() * expected.min()).sqrt())
        torch.testing.assert_close(duo / duo[0], plain / plain[0], rtol=2e-3, atol=0)
        single = awq_scales(x_mean, None, alpha, False)
        expected = (x_mean**alpha).clamp(min=1e-4)
        torch.testing.assert_close(single, expected / (expected.max() * expected.min()).sqrt())
    assert torch.equal(awq_scales(x_mean, None, 0.0, False), torch.ones(100))  # alpha 0 without duo: no scaling


def test_layer0_scales_are_the_formula_on_the_captured_activations(one_thread):
    # end to end for one layer: the scales folded into input_layernorm are s(alpha) computed in plain torch from
    # the float model's q/k/v inputs and weights, for the alpha the search reports
    model = randomize_norms(make_tiny_llama(hidden=96, layers=1, intermediate=160))
    attn = model.model.layers[0].self_attn
    seen = []
    handle = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 96)))
    with torch.no_grad():
        model(CALIB)
    handle.remove()
    x_mean = torch.cat(seen).double().abs().mean(0)
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().double()
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = awq_scale_model(model, CALIB, awq_config(group_size=64))
    info = report.linears["model.layers.0.self_attn.q_proj"]
    assert info["alpha"] is not None and info["scaled_into"] == "model.layers.0.input_layernorm"
    alpha = info["alpha"]
    w_mean = torch.cat([
        (w[:, a:b].abs() / (w[:, a:b].abs().amax(1, keepdim=True) + 1e-6)).mean(0) for a, b in ((0, 64), (64, 96))
    ])
    s = (x_mean**alpha / (w_mean ** (1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    folded = norm_before.double() / model.model.layers[0].input_layernorm.weight.detach().double()
    torch.testing.assert_close(folded, s, rtol=1e-4, atol=0)
    q_after = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    torch.testing.assert_close(q_after, w[:96] * s, rtol=1e-4, atol=1e-7)  # W diag(s): the other half of the fold


# --- the fold -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_scaled_float_model_computes_the_same(name, one_thread):
    model = randomize_norms(MODELS[name]())
    before = logits(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = awq_scale_model(model, CALIB, awq_config(group_size=64))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # the scales really moved weights around (else this test would prove nothing) ...
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert sum(info["alpha"] is not None for info in report.linears.values()) >= 4
    # ... and the function is the same
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)


def test_fold_into_a_quantized_linear_rescales_its_rows():
    linear = torch.nn.Linear(64, 48)
    scheme = QuantScheme(group_size=32, symmetric=False)
    q = QuantLinear.from_linear(linear, scheme)
    before, bias = q.dequantize_weight(torch.float32), q.bias.detach().clone()
    s = 0.5 + torch.rand(48, generator=torch.Generator().manual_seed(0))
    fold_inverse_scale(q, s)
    torch.testing.assert_close(q.dequantize_weight(torch.float32), before / s[:, None], rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(q.bias.detach(), bias / s)


# --- the searches never do worse than where they start ------------------------------------------------------
@pytest.mark.parametrize("name,scheme,options", [
    ("llama-gqa", dict(bits=4, group_size=64), {}),  # partial groups everywhere, asymmetric (AWQ's default)
    ("qwen2-gqa-bias", dict(bits=3, group_size=32, symmetric=True), {}),
    ("llama-mha", dict(bits=4, granularity="channel"), dict(true_sequential=False, duo_scaling=False)),
])
def test_every_group_at_most_rtn_and_clip_never_hurts(name, scheme, options, one_thread):
    # By construction: the identity scale (plain RTN) is a candidate of the scale search, and the clipped
    # weights are kept only if the block's output error does not grow. Errors compare the block reading the
    # group (attention, MLP, o, down) on the same calibration inputs.
    model = MODELS[name]()
    config = QuantConfig.for_method("awq", options=AWQConfig(**options),
                                    calibration=CalibrationConfig(n_samples=6, seq_len=40),
                                    **{"symmetric": False, **scheme})
    quantize(model, config, progress=False, calibration_data=CALIB)
    report = model.holdall_quant["report"]
    assert len(report["linears"]) == 14 and len(report["layers"]) == 2
    infos = report["linears"].values()
    for linear, info in report["linears"].items():
        assert info["rel_error"] <= info["search_rel_error"] <= info["rtn_rel_error"], linear
    assert sum(info["rel_error"] < 0.99 * info["rtn_rel_error"] for info in infos) >= 7  # AWQ does help
    assert any(info["clipped"] > 0 for info in infos)
    assert all(info["clipped"] == 0 for n, info in report["linears"].items() if n.endswith(("q_proj", "k_proj")))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert torch.isfinite(logits(model)).all()


def test_clip_search_per_group_error_against_plain_torch():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 72, generator=g)
    w[:, 5] *= 6  # outlier weights: clipping pays off somewhere
    x = torch.randn(300, 72, generator=g)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)  # 72 = 2 x 32 + 8
    result = clip_search(w, x, scheme, grid=20, max_shrink=0.5)
    assert (result.error <= result.error_unclipped).all()
    assert (result.error < result.error_unclipped).any()
    # recompute the chosen thresholds' errors the slow way: clamp, round with the core, per-group contributions
    clipped = torch.empty_like(w)
    for j, start in enumerate(range(0, 72, 32)):
        cols = slice(start, start + 32)
        limit = result.max_val[:, j : j + 1]
        clipped[:, cols] = torch.maximum(torch.minimum(w[:, cols], limit), -limit)
    deq = QuantizedTensor.from_float(clipped, scheme).dequantize()
    plain = QuantizedTensor.from_float(w, scheme).dequantize()
    for j, start in enumerate(range(0, 72, 32)):
        cols = slice(start, start + 32)
        err = ((x[:, cols] @ (w[:, cols] - deq[:, cols]).T) ** 2).mean(0)
        err0 = ((x[:, cols] @ (w[:, cols] - plain[:, cols]).T) ** 2).mean(0)
        torch.testing.assert_close(result.error[:, j], err, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.error_unclipped[:, j], err0, rtol=1e-4, atol=1e-6)
    absmax = torch.tensor([[float(w[r, c : c + 32].abs().max()) for c in range(0, 72, 32)] for r in range(16)])
    shrink = result.max_val / absmax
    assert ((shrink > 0.549) & (shrink <= 1.0 + 1e-6)).all()  # 1.0, 0.95, ..., 0.55


# --- grouped-query attention ------------------------------------------------------------------------------
def test_gqa_skips_v_to_o_and_mha_scales_it(one_thread):
    gqa = make_tiny_llama(hidden=64, layers=1, heads=4, kv_heads=2)
    quantize(gqa, awq_config(), progress=False, calibration_data=CALIB)
    info = gqa.holdall_quant["report"]["linears"]["model.layers.0.self_attn.o_proj"]
    assert info["scaled_into"] is None and info["alpha"] is None
    assert "grouped-query" in info["not_scaled"] and "32 outputs" in info["not_scaled"]

    mha = make_tiny_llama(hidden=64, layers=1, heads=4, kv_heads=4)
    report = awq_scale_model(mha, CALIB, awq_config())
    info = report.linears["model.layers.0.self_attn.o_proj"]
    assert info["not_scaled"] is None and info["scaled_into"] == "model.layers.0.self_attn.v_proj"


# --- configuration and bad inputs ---------------------------------------------------------------------------
def test_config_defaults_and_validation():
    config = QuantConfig.for_method("awq")
    assert config.scheme == QuantScheme(bits=4, group_size=128, symmetric=False)
    assert config.calibration == CalibrationConfig(n_samples=128, seq_len=512)
    assert config.options == AWQConfig(n_grid=20, duo_scaling=True, clip=True, clip_grid=20, clip_max_shrink=0.5,
                                       clip_tokens=512)
    again = QuantConfig.from_dict(json.loads(json.dumps(awq_config(clip=False).to_dict())))
    assert again == awq_config(clip=False)
    with pytest.raises(ConfigError, match="produces int"):
        QuantConfig.for_method("awq", dtype="nf4", group_size=64, symmetric=True)
    with pytest.raises(ConfigError, match="double"):
        QuantConfig.for_method("awq", double_quant=True)
    with pytest.raises(ConfigError, match="clip=False"):
        QuantConfig.for_method("awq", granularity="tensor")
    QuantConfig.for_method("awq", granularity="tensor", options=AWQConfig(clip=False))  # fine without clipping
    for bad in (dict(n_grid=0), dict(clip_max_shrink=1.0), dict(duo_scaling="yes"), dict(clip_tokens=-1)):
        with pytest.raises(ConfigError, match="AWQConfig"):
            AWQConfig(**bad)
    with pytest.raises(ConfigError, match="unknown AWQConfig"):
        AWQConfig.from_dict({"grid": 10})
    with pytest.raises(UnsupportedModelError, match="gemma"):
        AWQQuantizer(get_family("gemma"), config.scheme, AWQConfig(), "awq", seq_len=16)


def test_nan_activations_are_named(one_thread):
    model = make_tiny_llama(hidden=64, layers=2)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(DataError, match=r"layers\.1\.self_attn\.q_proj hold NaN"):
        quantize(model, awq_config(), progress=False, calibration_data=CALIB)
    model = make_tiny_llama(hidden=64, layers=1)
    with pytest.raises(ConfigError, match="tokenizer"):
        quantize(model, awq_config(), progress=False)


def test_save_load_round_trip_and_cli(tmp_path, capsys, tiny_llama_dir, tiny_text_file, one_thread):
    from holdall.cli.main import main
    from holdall.models.checkpoint import load_quantized, save_quantized

    model = randomize_norms(make_tiny_llama(hidden=64, layers=1))
    quantize(model, awq_config(), progress=False, calibration_data=CALIB)
    save_quantized(model, None, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert torch.equal(logits(loaded), logits(model))  # the folded norms travel with the codes
    assert loaded.holdall_quant["config"]["method"] == "awq"

    out_dir = tmp_path / "awq"
    code = main(["quantize", str(tiny_llama_dir), "--method", "awq", "--bits", "3", "--group-size", "32",
                 "--calib", str(tiny_text_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "-o", str(out_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["calibration_report"]["method"].startswith("awq:int3-g32-asym")
    manifest = json.loads((out_dir / "holdall_quant.json").read_text())
    assert manifest["config"]["options"]["clip"] is True and manifest["config"]["calibration"]["seq_len"] == 32
    code = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--no-clip", "-o", str(tmp_path / "x")])
    assert code == 2 and "awq only" in capsys.readouterr().err
