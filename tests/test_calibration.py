"""Calibration data (reproducible windows) and the sequential engine (layer by layer == one full forward)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.algorithms import CalibrationConfig, QuantConfig, quantize
from holdall.algorithms.calibration import calibration_ids, check_calibration_ids, sample_windows
from holdall.algorithms.sequential import input_groups, run_sequential
from holdall.errors import ConfigError, DataError
from holdall.models.families import get_family

IDS = torch.arange(1000)


# --- windows ---------------------------------------------------------------------------------------------
def test_windows_are_reproducible_by_seed():
    a = sample_windows(IDS, 6, 50, seed=3)
    assert a.shape == (6, 50) and a.dtype == torch.long
    assert torch.equal(a, sample_windows(IDS, 6, 50, seed=3))
    assert not torch.equal(a, sample_windows(IDS, 6, 50, seed=4))
    for row in a:  # consecutive tokens of the text
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 50))


def test_windows_are_the_gptq_reference_draw():
    # GPTQ's get_wikitext2 / the llm-compressor anchor: random.seed(seed); randrange(0, n - seq_len) per window
    random.seed(0)
    starts = [random.randrange(0, 1000 - 64) for _ in range(5)]
    assert sample_windows(IDS, 5, 64, seed=0)[:, 0].tolist() == starts


def test_short_text_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(IDS[:10], 2, 64)
    assert sample_windows(IDS[:64], 3, 64).shape == (3, 64)  # exactly one window fits: it is used n times


def test_calibration_ids_from_a_file_and_the_shipped_split(tiny_text_file):
    tok = make_tiny_tokenizer()
    ids = calibration_ids(CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32, seed=1), tok)
    assert ids.shape == (4, 32)
    assert torch.equal(ids, calibration_ids(CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32, seed=1), tok))
    default = calibration_ids(CalibrationConfig(n_samples=2, seq_len=16), tok)  # WikiText-2 valid
    assert default.shape == (2, 16)
    with pytest.raises(DataError, match="not found"):
        calibration_ids(CalibrationConfig(text="/no/such/file.txt", n_samples=1, seq_len=8), tok)


def test_config_checks_and_defaults():
    assert QuantConfig.for_method("gptq", calibration=CalibrationConfig(n_samples=16)).calibration.seq_len == 2048
    with pytest.raises(ConfigError, match="calibration-free"):
        QuantConfig(method="hqq", calibration=CalibrationConfig())
    with pytest.raises(ConfigError, match="seq_len"):
        CalibrationConfig(seq_len=1)
    with pytest.raises(ConfigError, match="device"):
        CalibrationConfig(device="nowhere")
    assert "options" not in QuantConfig().to_dict()  # rtn records are unchanged
    with pytest.raises(DataError, match="integer token ids"):
        check_calibration_ids(torch.zeros(2, 8))


# --- the engine --------------------------------------------------------------------------------------------
class Identity:
    """A 'quantizer' that changes nothing: the engine must then reproduce the plain forward exactly."""

    label = "identity"

    def __init__(self):
        self.seen: dict[str, int] = {}

    def observer(self, names, linears):
        return _Count()

    def quantize(self, names, linears, observer):
        self.seen.update({name: observer.tokens for name in names})
        return [(linear, {}) for linear in linears]


class _Count:
    tokens = 0

    def add_batch(self, x):
        assert x.dim() == 2
        self.tokens += x.shape[0]


def decoder_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


@pytest.mark.parametrize("true_sequential, batch_size", [(True, 3), (False, 8)])
def test_identity_engine_equals_a_full_forward(true_sequential, batch_size, one_thread):
    model = make_tiny_llama(hidden=64, layers=3)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(0))
    last = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: last.setdefault("out", out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantizer = Identity()
    result = run_sequential(model, decoder_names(model), quantizer, ids, true_sequential=true_sequential,
                            batch_size=batch_size, progress=False)
    torch.testing.assert_close(result.hidden_states, last["out"], rtol=1e-5, atol=1e-5)
    assert all(layer.rel_error == 0 for layer in result.report.layers)
    assert set(quantizer.seen) == set(decoder_names(model)) and set(quantizer.seen.values()) == {5 * 20}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing was changed


def test_groups_follow_the_forward_order():
    assert input_groups(get_family("llama")) == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]
    assert input_groups(get_family("phi3")) == [
        ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)
    ]


def test_true_sequential_sees_the_quantized_earlier_groups(one_thread):
    # o_proj's statistics must come from the attention output of the *quantized* q/k/v in true-sequential mode
    from holdall.algorithms.gptq import GPTQConfig, HessianObserver

    def o_proj_hessian(true_sequential: bool) -> torch.Tensor:
        captured = {}
        original = HessianObserver.hessian

        def spy(self):
            H = original(self)
            captured.setdefault(tuple(self.names), H)
            return H

        HessianObserver.hessian = spy
        try:
            model = make_tiny_llama(hidden=64, layers=1)
            config = QuantConfig.for_method(
                "gptq", bits=2, group_size=32, options=GPTQConfig(true_sequential=true_sequential),
                calibration=CalibrationConfig(n_samples=4, seq_len=16),
            )
            quantize(model, config, progress=False,
                     calibration_data=torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)))
        finally:
            HessianObserver.hessian = original
        return captured[("model.layers.0.self_attn.o_proj",)]

    assert not torch.allclose(o_proj_hessian(True), o_proj_hessian(False))


def test_nan_activations_name_the_layer(one_thread):
    model = make_tiny_llama(hidden=64, layers=2)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        run_sequential(model, decoder_names(model), Identity(), ids, progress=False)


def test_explicit_cpu_device_and_model_stays_put(one_thread):
    model = make_tiny_llama(hidden=64, layers=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    result = run_sequential(model, decoder_names(model), Identity(), ids, device="cpu", progress=False)
    assert result.hidden_states.device.type == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# --- the piecewise (Llama-shaped) path ------------------------------------------------------------------------
def _gptq_run(model, piecewise: bool, monkeypatch, calls: list):
    from holdall.algorithms import sequential
    from holdall.algorithms.gptq import GPTQConfig

    original = sequential._ResidualBlock.calibrate

    def spy(self, *args, **kwargs):
        calls.append(self.layer)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sequential._ResidualBlock, "calibrate", spy)
    if not piecewise:
        monkeypatch.setattr(sequential._ResidualBlock, "match", classmethod(lambda cls, layer, groups: None))
    config = QuantConfig.for_method("gptq", bits=3, group_size=32, options=GPTQConfig(act_order=True),
                                    calibration=CalibrationConfig(n_samples=6, seq_len=24, batch_size=4))
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
    quantize(model, config, progress=False, calibration_data=ids)
    monkeypatch.undo()
    return model


def test_piecewise_llama_block_matches_the_generic_path(monkeypatch, one_thread):
    # the piecewise path must see the same statistics as re-running the layer: same codes, same outputs
    calls: list = []
    fast = _gptq_run(make_tiny_llama(hidden=64, layers=3), True, monkeypatch, calls)
    assert len(calls) == 3  # every layer took the piecewise path
    slow_calls: list = []
    slow = _gptq_run(make_tiny_llama(hidden=64, layers=3), False, monkeypatch, slow_calls)
    assert not slow_calls
    fast_layers = fast.holdall_quant["report"]["layers"]
    slow_layers = slow.holdall_quant["report"]["layers"]
    for a, b in zip(fast_layers, slow_layers):
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-3)
    fs, ss = fast.state_dict(), slow.state_dict()
    codes = [k for k in fs if fs[k].dtype in (torch.uint8, torch.int8, torch.int32)]
    assert codes
    mismatch = sum(int((fs[k] != ss[k]).sum()) for k in codes)
    total = sum(fs[k].numel() for k in codes)
    assert mismatch <= 0.001 * total  # float summation order may flip a rare tie, nothing more
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens).logits, slow(tokens).logits, rtol=1e-3, atol=1e-3)


def test_a_layer_of_another_shape_takes_the_generic_path(monkeypatch, one_thread):
    # a residual the pieces don't know about (here: the MLP's update doubled) must be caught by the check
    model = make_tiny_llama(hidden=64, layers=2)
    for layer in model.model.layers:
        mlp_forward = layer.mlp.forward
        layer.mlp.forward = lambda x, f=mlp_forward: f(x)
        original = layer.forward

        def doubled(hidden_states, *args, _orig=original, _layer=layer, **kwargs):
            h = hidden_states + _layer.self_attn(hidden_states=_layer.input_layernorm(hidden_states), **kwargs)[0]
            return h + 2 * _layer.mlp(_layer.post_attention_layernorm(h))

        layer.forward = doubled
    calls: list = []
    _gptq_run(model, True, monkeypatch, calls)
    assert not calls
