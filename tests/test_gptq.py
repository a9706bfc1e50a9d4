"""GPTQ: the algorithm on single weights (where it must equal RTN, where it must beat it, when H is broken),
then through quantize() on tiny random Llamas, the checkpoint round trip and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from holdall.algorithms import CalibrationConfig, GPTQConfig, QuantConfig, quantize
from holdall.algorithms.gptq import gptq_quantize, inverse_hessian_factor, output_error
from holdall.core.affine import dequantize_affine, quantize_affine
from holdall.core.linear import QuantLinear
from holdall.core.packing import unpack
from holdall.core.qtensor import QuantizedTensor
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError

SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=3, group_size=32, symmetric=False),
    QuantScheme(bits=4, group_size=40),  # 96 = 2 x 40 + a partial group of 16
    QuantScheme(bits=2, group_size=32),
    QuantScheme(bits=8, group_size=64, symmetric=False),  # 96 = 64 + 32
    QuantScheme(bits=4, granularity="channel"),
    QuantScheme(bits=3, granularity="tensor", scale_dtype="float32"),
]


def correlated(seed: int, n_in: int = 96, n_out: int = 48, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian 2/n XᵀX of correlated inputs with a few high-energy channels (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    X = torch.randn(tokens, n_in, generator=g) @ mix
    X[:, torch.randperm(n_in, generator=g)[:6]] *= 8
    return torch.randn(n_out, n_in, generator=g), 2 * X.T @ X / tokens


def dequant(result, scheme):
    return dequantize_affine(result.codes, result.scale, result.zero, scheme)


def rtn(w, scheme):
    return QuantizedTensor.from_float(w, scheme)


# --- where GPTQ must equal round-to-nearest --------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_diagonal_hessian_is_exactly_rtn(scheme, act_order):
    # Uncorrelated inputs: U (the factor of H^-1) is diagonal, no error is fed forward, and every group's
    # parameters are fitted on untouched weights, so the codes, scales and zeros are RTN's, bit for bit.
    # (Distinct diagonal entries: act-order really permutes.)
    w, _ = correlated(0)
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))
    H = torch.diag(torch.linspace(0.5, 3.0, w.shape[1])[order])
    # (range_choice off — the default from 4 bits; with it a symmetric row may take the unclipped grid, next test)
    result = gptq_quantize(w, H, scheme, GPTQConfig(act_order=act_order, range_choice=False))
    ref = rtn(w, scheme).tensors()
    assert torch.equal(result.codes, unpack(ref["qdata"], scheme.bits, w.shape[1]))
    assert torch.equal(result.scale, ref["scale"])
    if not scheme.symmetric:
        assert torch.equal(result.zero, unpack(ref["zero"], scheme.bits, result.scale.shape[1]))
    assert torch.equal(dequant(result, scheme), rtn(w, scheme).dequantize())
    assert result.damp == 0.01 and result.notes == []


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.symmetric and s.granularity != "tensor"],
                         ids=lambda s: s.label)
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_range_choice_takes_per_row_the_better_of_two_rtn_grids(scheme, act_order):
    # Diagonal H: no feedback, so each grid's result is its RTN; every row must be one of the two, chosen by the
    # lower H-weighted error — never worse than plain RTN, row by row, and better on some rows.
    from holdall.algorithms.gptq import _unclipped_scales

    w, _ = correlated(0)
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))
    H = torch.diag(torch.linspace(0.5, 3.0, w.shape[1])[order])
    config = GPTQConfig(act_order=act_order, range_choice=True)
    if scheme.granularity == "group" and not config.static_groups:
        config = GPTQConfig(act_order=act_order, static_groups=True, range_choice=True)
    result = gptq_quantize(w, H, scheme, config)
    clipped = rtn(w, scheme)
    scale = clipped.tensors()["scale"]
    wide = _unclipped_scales(scale, scheme)
    wide_codes = quantize_affine(w, wide, None, scheme)

    def err(w_hat):
        e = w - w_hat
        return ((e @ H) * e).sum(dim=1)

    e_clip, e_wide = err(clipped.dequantize()), err(dequantize_affine(wide_codes, wide, None, scheme))
    take = e_wide < e_clip
    assert not take.all()
    if scheme.bits > 2:  # at 2 bits the unclipped grid (levels -2..1 x absmax) is too coarse to win on this data
        assert take.any()  # a real choice on this data
    expected = torch.where(take[:, None], wide_codes, unpack(clipped.tensors()["qdata"], scheme.bits, w.shape[1]))
    assert torch.equal(result.codes, expected)
    assert torch.equal(result.scale, torch.where(take[:, None], wide, scale))
    assert (err(dequant(result, scheme)) <= e_clip).all()


def test_all_dead_inputs_give_a_zero_weight():
    # Zero information: every input channel is always 0, so any weight gives the same output; GPTQ zeroes it.
    w, _ = correlated(1)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    result = gptq_quantize(w, torch.zeros(96, 96), scheme, GPTQConfig())
    assert torch.equal(dequant(result, scheme), torch.zeros_like(w))


def test_dead_columns_are_zeroed_and_the_rest_is_quantized():
    w, H = correlated(2)
    dead = torch.tensor([0, 5, 50, 95])
    H[dead, :] = 0
    H[:, dead] = 0
    scheme = QuantScheme(bits=4, group_size=32)
    for act_order in (False, True):
        deq = dequant(gptq_quantize(w, H, scheme, GPTQConfig(act_order=act_order)), scheme)
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[:, dead], torch.zeros(w.shape[0], len(dead)))
        assert output_error(w, deq, H) < output_error(w, rtn(w, scheme).dequantize(), H)


# --- where GPTQ must do better ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_output_error_at_most_rtn_on_correlated_inputs(scheme):
    # GPTQ is greedy, not optimal. At 2 bits the reference's dynamic groups (fitted on weights already bent
    # by the fed-forward error, whose range has grown) can lose to RTN (seed 0 here: 1.035x); static groups,
    # fitted on the original weights, do not: ~0.75x. 3-8 bits win either way.
    options = GPTQConfig(static_groups=scheme.bits == 2)
    for seed in range(3):
        w, H = correlated(seed)
        ours = output_error(w, dequant(gptq_quantize(w, H, scheme, options), scheme), H)
        base = output_error(w, rtn(w, scheme).dequantize(), H)
        assert ours <= base * (1.0001 if scheme.bits == 8 else 0.95), (seed, ours, base)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=32), QuantScheme(bits=3, group_size=40, symmetric=False), QuantScheme(bits=4, granularity="channel")],
    ids=lambda s: s.label,
)
def test_act_order_improves_or_matches(scheme):
    # with a few high-energy input channels, quantizing them first (while every other column can still absorb
    # their error) wins on every one of these seeds
    for seed in range(4):
        w, H = correlated(seed)
        plain = output_error(w, dequant(gptq_quantize(w, H, scheme, GPTQConfig()), scheme), H)
        ordered = output_error(w, dequant(gptq_quantize(w, H, scheme, GPTQConfig(act_order=True)), scheme), H)
        assert ordered <= plain, (seed, ordered, plain)


def test_act_order_keeps_plain_group_layout_with_static_groups():
    w, H = correlated(3)
    scheme = QuantScheme(bits=4, group_size=40)
    result = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True, range_choice=False))
    # static groups: the parameters are RTN's of the original (unpermuted) groups
    assert torch.equal(result.scale, rtn(w, scheme).tensors()["scale"])
    assert result.scale.shape == (48, 3)
    # with the range choice a row's scales are RTN's or the unclipped grid's, all groups of a row alike
    from holdall.algorithms.gptq import _unclipped_scales

    chosen = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True, range_choice=True)).scale
    clipped = rtn(w, scheme).tensors()["scale"]
    wide_rows = (chosen == _unclipped_scales(clipped, scheme)).all(dim=1)
    assert torch.equal(chosen[~wide_rows], clipped[~wide_rows])


def test_block_size_changes_only_float_rounding():
    w, H = correlated(4)
    scheme = QuantScheme(bits=4, group_size=32)
    codes = [gptq_quantize(w, H, scheme, GPTQConfig(block_size=b)).codes for b in (1, 32, 128)]
    for other in codes[1:]:
        assert (other == codes[0]).float().mean() > 0.995


# --- broken Hessians --------------------------------------------------------------------------------------
def test_indefinite_hessian_raises_the_damping_and_never_gives_nan():
    w, H = correlated(5)
    v = torch.randn(96, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    H_bad = H - 3 * torch.linalg.eigvalsh(H)[-1] * torch.outer(v, v)  # a strongly negative eigenvalue
    assert torch.linalg.cholesky_ex(H_bad.double() + 0.01 * H_bad.diagonal().mean() * torch.eye(96))[1] != 0
    scheme = QuantScheme(bits=4, group_size=32)
    result = gptq_quantize(w, H_bad, scheme, GPTQConfig())
    assert result.damp is not None and result.damp > 0.01
    assert any("damping" in note for note in result.notes)
    assert torch.isfinite(dequant(result, scheme)).all()


def test_hopeless_hessian_falls_back_to_rtn():
    w, _ = correlated(6)
    scheme = QuantScheme(bits=4, group_size=32)
    result = gptq_quantize(w, -1000 * torch.eye(96), scheme, GPTQConfig(damp_retries=2))
    assert result.damp is None
    assert any("round-to-nearest" in note for note in result.notes)
    assert torch.equal(dequant(result, scheme), rtn(w, scheme).dequantize())


def test_inverse_factor_is_the_cholesky_factor_of_the_inverse():
    # the reversed-Cholesky shortcut must give the reference's chol(cholesky_inverse(chol(H)), upper)
    _, H = correlated(8)
    H = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(96, dtype=torch.float64)
    U, damp, _ = inverse_hessian_factor(H, GPTQConfig(damp_percent=0.0))
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert damp == 0.0
    torch.testing.assert_close(U.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(U.double().T @ U.double() @ H, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-4)


def test_singular_hessian_from_few_tokens_is_damped_fine():
    # 8 tokens for 96 inputs: H has rank 8; the default damping makes it positive definite
    g = torch.Generator().manual_seed(7)
    X = torch.randn(8, 96, generator=g)
    U, damp, notes = inverse_hessian_factor(2 * X.T @ X / 8, GPTQConfig())
    assert U is not None and damp == 0.01 and notes == [] and torch.isfinite(U).all()


def test_config_validation():
    with pytest.raises(ConfigError, match="g_idx"):
        GPTQConfig(act_order=True, static_groups=False)
    assert GPTQConfig(act_order=True).static_groups is True
    assert GPTQConfig().static_groups is False
    with pytest.raises(ConfigError, match="double"):
        QuantConfig.for_method("gptq", double_quant=True)
    with pytest.raises(ConfigError, match="damp_percent"):
        GPTQConfig(damp_percent=-1)
    with pytest.raises(ConfigError, match="GPTQConfig"):
        QuantConfig(method="gptq", options=object())
    with pytest.raises(ConfigError, match="takes no options"):
        QuantConfig(method="rtn", options=GPTQConfig())
    config = QuantConfig.for_method("gptq", bits=3, options=GPTQConfig(act_order=True),
                                    calibration=CalibrationConfig(n_samples=4, seq_len=16))
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert QuantConfig.for_method("gptq").calibration == CalibrationConfig(n_samples=128, seq_len=2048)


# --- through quantize() on tiny Llamas -------------------------------------------------------------------
CALIB = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def gptq_config(**options) -> QuantConfig:
    return QuantConfig.for_method(
        "gptq", group_size=32, options=GPTQConfig(**options), calibration=CalibrationConfig(n_samples=8, seq_len=48)
    )


def test_every_linear_beats_rtn_on_its_calibration_inputs(one_thread):
    model = make_tiny_llama(hidden=96, layers=2)  # 96 = 3 x 32; intermediate 192
    quantize(model, gptq_config(), progress=False, calibration_data=CALIB)
    report = model.holdall_quant["report"]
    assert len(report["linears"]) == 14 and len(report["layers"]) == 2
    for name, info in report["linears"].items():
        assert info["rel_error"] <= info["rtn_rel_error"], name
        assert info["damp"] == 0.01 and info["notes"] == []
    assert all(0 < layer["rel_error"] < 0.5 for layer in report["layers"])
    assert report["bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_decoder_layer_output_error_at_most_rtn(one_thread):
    from holdall.algorithms.sequential import run_sequential

    class RTN:  # the engine with plain rounding: the same per-layer report for the baseline
        label = "rtn"

        def observer(self, names, linears):
            return self

        def add_batch(self, x):
            pass

        def quantize(self, names, linears, observer):
            return [(QuantLinear.from_linear(linear, QuantScheme(group_size=32)), {}) for linear in linears]

    model = make_tiny_llama(hidden=96, layers=3)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    baseline = run_sequential(model, names, RTN(), CALIB, progress=False).report
    model = make_tiny_llama(hidden=96, layers=3)
    quantize(model, gptq_config(), progress=False, calibration_data=CALIB)
    for ours, base in zip(model.holdall_quant["report"]["layers"], baseline.layers):
        assert ours["rel_error"] <= base.rel_error, (ours, base)


def test_act_order_and_one_pass_modes_run(one_thread):
    for options in ({"act_order": True}, {"true_sequential": False}):
        model = make_tiny_llama(hidden=96, layers=1)
        quantize(model, gptq_config(**options), progress=False, calibration_data=CALIB)
        with torch.no_grad():
            assert torch.isfinite(model(TOKENS).logits).all()


def test_save_load_round_trip_keeps_logits(tmp_path, one_thread):
    from holdall.models.checkpoint import load_quantized, save_quantized

    model = make_tiny_llama(hidden=96, layers=1)
    quantize(model, gptq_config(act_order=True), progress=False, calibration_data=CALIB)
    with torch.no_grad():
        before = model(TOKENS).logits
    save_quantized(model, None, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, before)
    assert loaded.holdall_quant["config"]["options"]["act_order"] is True


def test_calibration_is_required_and_checked(one_thread):
    model = make_tiny_llama(hidden=64, layers=1)
    with pytest.raises(ConfigError, match="tokenizer"):
        quantize(model, gptq_config(), progress=False)
    with pytest.raises(Exception, match="vocabulary"):
        quantize(model, gptq_config(), progress=False, calibration_data=CALIB + 1000)
    with pytest.raises(ConfigError, match="decoder-layer linear"):
        quantize(model, QuantConfig.for_method("gptq", targets=("lm_head",)), progress=False, calibration_data=CALIB)


def test_cli_gptq_with_a_calibration_file(capsys, tmp_path, tiny_llama_dir, tiny_text_file):
    from holdall.cli.main import main

    out_dir = tmp_path / "gptq"
    code = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
                 "--act-order", "--calib", str(tiny_text_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "-o", str(out_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["calibration_report"]["n_samples"] == 4
    manifest = json.loads((out_dir / "holdall_quant.json").read_text())
    assert manifest["config"]["options"]["act_order"] is True
    assert manifest["config"]["calibration"]["text"] == str(tiny_text_file)
    assert "decoder layers" in captured.err  # the engine's summary

    code = main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--act-order", "-o", str(tmp_path / "x")])
    assert code == 2 and "gptq only" in capsys.readouterr().err


def test_range_choice_default_depends_on_the_width():
    # None: on for 2-3 bits (where it wins on test text), off from 4 bits (where it does not)
    w, H = correlated(5)
    for bits, expect_same in ((4, True), (3, False)):
        scheme = QuantScheme(bits=bits, group_size=32)
        default = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True))
        off = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True, range_choice=False))
        on = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True, range_choice=True))
        assert torch.equal(default.codes, off.codes if expect_same else on.codes)
    assert not torch.equal(on.codes, off.codes)  # at 3 bits the choice really changed rows here
    with pytest.raises(ConfigError, match="range_choice"):
        GPTQConfig(range_choice="yes")
