"""GPTQ into NF4/FP4 (± double quant): the data-aware QLoRA base, in exactly the RTN NF4 storage."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.algorithms import GPTQConfig, QuantConfig, quantize
from holdall.algorithms.gptq import gptq_quantize, output_error
from holdall.algorithms.gptq_codebook import decode, refit_scales, rtn_candidate, row_errors
from holdall.algorithms.packed import quant_linear_from_codes
from holdall.core import codebook
from holdall.core.linear import QuantLinear
from holdall.core.packing import pack
from holdall.core.qtensor import QuantizedTensor
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, DataError
from holdall.training import FinetuneConfig, finetune
from holdall.training.qlora import QLoraBase, calibration_from_examples, quantize_for_qlora

pytestmark = pytest.mark.usefixtures("one_thread")

NF4_DQ = QuantScheme(dtype="nf4", group_size=64, double_quant=True)
SCHEMES = {
    "nf4-dq": NF4_DQ,
    "nf4": QuantScheme(dtype="nf4", group_size=64),
    "fp4-dq": QuantScheme(dtype="fp4", group_size=32, double_quant=True),
}


def _correlated_hessian(n: int, seed: int = 0, tokens: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 + torch.randn(n, generator=g)
    return 2 * x.T @ x / tokens


def _weight(out_features=48, in_features=128, seed=0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_codes_are_stored_in_the_standard_codebook_layout_and_decode_with_its_dequantize(name):
    scheme = SCHEMES[name]
    w, H = _weight(), _correlated_hessian(128)
    result = gptq_quantize(w, H, scheme, GPTQConfig(act_order=True, refit_scales=True))
    linear = nn.Linear(128, 48, bias=False)
    layer = quant_linear_from_codes(linear, result.codes, result.scale, None, scheme)
    assert isinstance(layer, QuantLinear) and layer.scheme == scheme
    stored = layer.quantized_weight.tensors()
    rtn = QuantizedTensor.from_float(w, scheme).tensors()
    # the same tensors, shapes and dtypes as round-to-nearest NF4 (+ DQ): the same bytes per weight
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in rtn.items()
    }
    # the core's (bitsandbytes') decoding of those bytes is exactly table[code] * double-dequantized scale
    scales = (
        codebook.double_dequantize(stored["scale"], stored["scale_absmax"], stored["scale_offset"])
        if scheme.double_quant
        else stored["scale"]
    )
    assert (stored["qdata"] == pack(result.codes.reshape(-1), 4).reshape(-1, 1)).all()
    by_core = codebook.dequantize_4bit(stored["qdata"], scales, scheme.dtype, scheme.group_size, (48, 128))
    assert torch.equal(layer.dequantize_weight(torch.float32), by_core)
    assert torch.equal(decode(result.codes, result.scale, scheme), by_core)


def test_the_stored_bytes_dequantize_in_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w, H = _weight(), _correlated_hessian(128)
    result = gptq_quantize(w, H, NF4_DQ, GPTQConfig(refit_scales=True, act_order=True))
    layer = quant_linear_from_codes(nn.Linear(128, 48, bias=False), result.codes, result.scale, None, NF4_DQ)
    t = layer.quantized_weight.tensors()
    # bitsandbytes' own state for a tensor of this size (flat: its CPU row layout is trivially right there),
    # with our stored statistics put in place of its own
    _, state = bnbf.quantize_4bit(w.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert state.absmax.shape == t["scale"].shape and state.absmax.dtype == t["scale"].dtype
    state.absmax, state.offset, state.state2.absmax = t["scale"], t["scale_offset"], t["scale_absmax"]
    theirs = bnbf.dequantize_4bit(t["qdata"], state).reshape(48, 128)
    assert torch.equal(theirs, layer.dequantize_weight(torch.float32))


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_reproduces_round_to_nearest_codes(name, act_order):
    scheme = SCHEMES[name]
    w = _weight(seed=3)
    result = gptq_quantize(w, torch.eye(128), scheme, GPTQConfig(act_order=act_order))
    rtn = QuantizedTensor.from_float(w, scheme)
    ours = quant_linear_from_codes(nn.Linear(128, 48, bias=False), result.codes, result.scale, None, scheme)
    for key, value in rtn.tensors().items():
        assert (ours.quantized_weight.tensors()[key] == value).all(), key
    assert (result.codes == rtn_candidate(w, scheme).codes).all()


def test_error_feedback_beats_round_to_nearest_and_refit_helps():
    w, H = _weight(96, 128, seed=1), _correlated_hessian(128, seed=1)
    rtn = QuantizedTensor.from_float(w, NF4_DQ).dequantize()
    plain = gptq_quantize(w, H, NF4_DQ, GPTQConfig())
    refit = gptq_quantize(w, H, NF4_DQ, GPTQConfig(refit_scales=True, act_order=True))
    err = {
        "rtn": output_error(w, rtn, H),
        "gptq": output_error(w, decode(plain.codes, plain.scale, NF4_DQ), H),
        "refit": output_error(w, decode(refit.codes, refit.scale, NF4_DQ), H),
    }
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert err["refit"] <= err["gptq"], err


def test_least_squares_refit_never_increases_the_error_for_fixed_codes():
    w, H = _weight(32, 128, seed=2), _correlated_hessian(128, seed=2)
    rtn = rtn_candidate(w, QuantScheme(dtype="nf4", group_size=64))
    scheme = QuantScheme(dtype="nf4", group_size=64)
    fitted = refit_scales(w, rtn.codes, H, scheme)
    before = row_errors(w, decode(rtn.codes, rtn.scales, scheme), H)
    after = row_errors(w, decode(rtn.codes, fitted, scheme), H)
    assert (after <= before * (1 + 1e-6) + 1e-9).all()


def _calibration_ids(n=8, seq=32, seed=0):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [GPTQConfig(), GPTQConfig(act_order=True, refit_scales=True)])
def test_sequential_gptq_nf4_is_never_worse_than_rtn_for_any_linear(options):
    model = make_tiny_llama(hidden=128, intermediate=256)
    config = QuantConfig.for_method("gptq", dtype="nf4", group_size=64, double_quant=True, options=options)
    quantize(model, config, progress=False, calibration_data=_calibration_ids())
    linears = model.holdall_quant["report"]["linears"]
    assert len(linears) == 2 * 7
    for name, info in linears.items():
        assert info["rel_error"] <= info["rtn_rel_error"] * (1 + 1e-6), (name, info)
        assert isinstance(model.get_submodule(name), QuantLinear)
        assert model.get_submodule(name).scheme == NF4_DQ
    # q/k/v share one Hessian; their error must beat RTN clearly on this correlated data
    mean_ratio = sum(i["rel_error"] / i["rtn_rel_error"] for i in linears.values()) / len(linears)
    assert mean_ratio < 0.95
    with torch.no_grad():
        assert torch.isfinite(model(_calibration_ids(1, 16)).logits).all()


def test_codebook_gptq_refuses_blocks_that_straddle_rows_and_int_only_options():
    with pytest.raises(ConfigError, match="straddle rows"):
        gptq_quantize(_weight(8, 96), torch.eye(96), NF4_DQ, GPTQConfig())
    with pytest.raises(ConfigError, match="codebook schemes"):
        QuantConfig.for_method("gptq", options=GPTQConfig(refit_scales=True))
    with pytest.raises(DataError, match="NaN"):
        H = torch.eye(128)
        H[3, 4] = float("nan")
        gptq_quantize(_weight(), H, NF4_DQ, GPTQConfig())


def test_nan_calibration_activations_are_a_data_error_naming_the_linear():
    model = make_tiny_llama(hidden=128, intermediate=256)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(DataError, match=r"mlp\.gate_proj.*NaN/Inf"):
        quantize_for_qlora(model, base=QLoraBase(method="gptq"), calibration_ids=_calibration_ids())


def test_calibration_windows_from_training_examples():
    class Ex:
        def __init__(self, ids):
            self.input_ids = ids

    examples = [Ex(list(range(i * 10, i * 10 + 10))) for i in range(10)]  # 100 tokens
    few = calibration_from_examples(examples, 64, 30)
    assert few.shape == (3, 30) and few[0].tolist() == list(range(30))  # all it holds, no overlap
    many = calibration_from_examples(examples, 4, 10, seed=1)
    assert many.shape == (4, 10)
    assert torch.equal(many, calibration_from_examples(examples, 4, 10, seed=1))
    assert calibration_from_examples(examples[:1], 8, 64).shape == (1, 10)


# --- finetune -----------------------------------------------------------------------------------------------


def _config(**kw):
    base = dict(method="qlora", base_quant="gptq", r=4, alpha=8, dropout=0.0, lr=3e-2, max_steps=12, batch_size=2,
                warmup=0, max_len=32, eval_fraction=0.25, eval_every=6, schedule="constant", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("calib", [None, "text"])
def test_qlora_finetune_on_a_gptq_nf4_base_trains(finetune_data_file, tmp_path, tiny_text_file, calib):
    model = make_tiny_llama()
    config = _config(calib=str(tiny_text_file) if calib else None, calib_samples=4, calib_seq_len=16)
    result = finetune(model, finetune_data_file, config, tmp_path / "adapter", tokenizer=make_tiny_tokenizer())
    assert result.steps == 12
    record = model.holdall_quant
    assert record["config"]["method"] == "gptq" and record["config"]["scheme"]["dtype"] == "nf4"
    assert record["config"]["scheme"]["double_quant"] and record["config"]["scheme"]["group_size"] == 64
    assert record["config"]["calibration"]["text"] == (str(tiny_text_file) if calib else None)
    history = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.15
    # evals come at steps 6 and 12 only (too close to compare on a random tiny model): against the first step's loss
    assert evals[-1] < train[0] - 0.2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_finetune_refuses_bad_base_quant_settings(finetune_data_file, tmp_path):
    with pytest.raises(DataError, match="calibration text not found"):
        finetune(make_tiny_llama(), finetune_data_file, _config(calib=str(tmp_path / "missing.txt")), tmp_path / "a",
                 tokenizer=make_tiny_tokenizer())
    with pytest.raises(ConfigError, match="method 'lora' trains on the float base"):
        _config(method="lora")
    with pytest.raises(ConfigError, match="base_quant='gptq' only"):
        _config(base_quant="rtn", calib="x.txt")
    with pytest.raises(ConfigError, match="must be one of rtn, gptq"):
        _config(base_quant="awq")


def test_cli_quantize_gptq_into_nf4(tiny_llama_dir, tmp_path, capsys):
    from holdall.cli.main import main
    from holdall.models import load_model

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 200))
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--codebook", "nf4", "--double-quant",
               "--refit-scales", "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "32",
               "-o", str(out)])
    assert rc == 0
    model, _ = load_model(str(out))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.scheme == NF4_DQ


def test_cli_finetune_with_a_gptq_base(tiny_llama_dir, finetune_data_file, tmp_path, capsys):
    from holdall.cli.main import main

    out = tmp_path / "adapter"
    rc = main(["finetune", str(tiny_llama_dir), "--data", str(finetune_data_file), "--method", "qlora", "--base-quant", "gptq",
               "--calib-samples", "2", "--calib-seq-len", "16", "--max-steps", "2", "--max-len", "32",
               "--device", "cpu", "-o", str(out), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    rc = main(["finetune", str(tiny_llama_dir), "--data", str(finetune_data_file), "--method", "lora", "--base-quant", "gptq",
               "-o", str(tmp_path / "b")])
    assert rc == 2 and "trains on the float base" in capsys.readouterr().err


def test_default_finetune_records_are_unchanged_by_the_base_quant_fields():
    """The pipeline fingerprints FinetuneConfig.to_dict(): a round-to-nearest config must write the keys it always did."""
    record = FinetuneConfig(method="qlora").to_dict()
    assert not {"base_quant", "calib", "calib_samples", "calib_seq_len"} & set(record)
    assert FinetuneConfig(**record) == FinetuneConfig(method="qlora")
    gptq = _config(calib_samples=8).to_dict()
    assert gptq["base_quant"] == "gptq" and gptq["calib_samples"] == 8
    assert FinetuneConfig(**gptq) == _config(calib_samples=8)
