"""compressed-tensors pack-quantized export/import, checked against the compressed-tensors package and transformers.

Independent readers: transformers + compressed-tensors load holdall's export on CPU (logits match holdall's),
compressed-tensors' own ``unpack_from_int32`` decodes the packed codes, and a checkpoint made by llm-compressor
itself (tests/fixtures/llmcompressor_gptq_w4g64, made by benchmarks/make_llmcompressor_fixture.py in its own
environment) reads back into holdall with the logits transformers computed for it there.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import holdall
from holdall.algorithms import QuantConfig, quantize
from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError, UnsupportedModelError
from holdall.formats import export_checkpoint
from holdall.formats.compressed_tensors import export_compressed_tensors

# the independent reader; round trips and refusals run without it
needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="pip install compressed-tensors (the independent reader)")

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5, 30], [2, 8, 8, 15, 40, 0, 33, 6]])
FIXTURE = Path(__file__).parent / "fixtures" / "llmcompressor_gptq_w4g64"
BUFFERS = ("qdata", "scale", "zero")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _quantized(tie=False, **scheme):
    return quantize(make_tiny_llama(tie=tie), QuantConfig.for_method("rtn", **scheme), progress=False)


def _same_buffers(a, b):
    for name in a.holdall_quant["layers"]:
        la, lb = a.get_submodule(name), b.get_submodule(name)
        assert isinstance(lb, QuantLinear), name
        for buf in BUFFERS:
            if buf in la._buffers:
                assert torch.equal(la._buffers[buf], lb._buffers[buf]), f"{name}.{buf}"


def _hf(directory, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()


@pytest.mark.parametrize(
    "scheme",
    [dict(bits=4, group_size=32), dict(bits=4, group_size=16, symmetric=False), dict(bits=8, granularity="channel"),
     dict(bits=2, group_size=32), dict(bits=3, group_size=32, symmetric=False)],
    ids=["int4-g32", "int4-g16-asym", "int8-ch", "int2-g32", "int3-g32-asym"],
)
def test_round_trip_same_codes_and_logits(tmp_path, scheme):
    model = _quantized(**scheme)
    out = export_compressed_tensors(model, tmp_path / "ct", make_tiny_tokenizer())
    back, tokenizer = holdall.load_model(out)
    assert tokenizer is not None
    assert back.holdall_quant["layers"] == model.holdall_quant["layers"]
    _same_buffers(model, back)
    assert torch.equal(_logits(back), _logits(model))


@needs_ct
def test_layout_matches_compressed_tensors_unpacker(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model = _quantized(bits=4, group_size=16, symmetric=False)
    out = export_compressed_tensors(model, tmp_path / "ct")
    stored = load_file(str(out / "model.safetensors"))
    layer = model.get_submodule("model.layers.1.self_attn.k_proj")  # [32, 64]
    name = "model.layers.1.self_attn.k_proj"
    shape = torch.Size(stored[f"{name}.weight_shape"].tolist())
    signed = unpack_from_int32(stored[f"{name}.weight_packed"], 4, shape)
    zp = unpack_from_int32(stored[f"{name}.weight_zero_point"], 4, torch.Size([shape[0], 4]), packed_dim=0)
    scale = stored[f"{name}.weight_scale"].float()
    # compressed-tensors' convention: w = (s - zp) * scale per group, on signed codes
    weight = ((signed.float() - zp.float().repeat_interleave(16, dim=1)) * scale.repeat_interleave(16, dim=1))
    assert torch.equal(weight, layer.dequantize_weight(torch.float32))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 16, False)
    assert weights["strategy"] == "group"


@needs_ct
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_loads_export_with_same_logits(tmp_path, tie):
    model = _quantized(tie=tie, bits=4, group_size=32)
    out = export_checkpoint(model, tmp_path / "ct", format="compressed-tensors", tokenizer=make_tiny_tokenizer())
    hf = _hf(out)  # compressed in memory, decompressed by compressed-tensors on the forward pass
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=1e-5)


@needs_ct
def test_transformers_loads_asymmetric_and_int8_exports(tmp_path):
    # transformers 5.24's compressed (non-dequantized) path rejects packed zero points, llm-compressor's own
    # asymmetric checkpoints included; its dequantize=True path reads them.
    for scheme in (dict(bits=4, group_size=16, symmetric=False), dict(bits=8, granularity="channel")):
        model = _quantized(**scheme)
        out = export_compressed_tensors(model, tmp_path / f"ct{scheme['bits']}")
        hf = _hf(out, dequantize=True)
        for name in model.holdall_quant["layers"]:
            # compressed-tensors dequantizes in the scale dtype (float16): holdall's weight rounded to float16
            expected = model.get_submodule(name).dequantize_weight(torch.float32).half().float()
            assert torch.equal(hf.get_submodule(name).weight.float(), expected), name
        torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=2e-3)


@needs_ct
def test_several_schemes_and_float_layers(tmp_path):
    model = make_tiny_llama()
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32, exclude=(r".*\.mlp\..*",)), progress=False)
    quantize(model, QuantConfig.for_method("rtn", bits=8, granularity="channel", targets=(r".*\.mlp\.(up|gate)_proj",)),
             progress=False, force=True)  # force: a second pass over layers still in float (no double rounding)
    out = export_compressed_tensors(model, tmp_path / "mixed")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    assert sorted(config["ignore"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    back, _ = holdall.load_model(out)
    assert not isinstance(back.model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(_logits(back), _logits(model))
    torch.testing.assert_close(_logits(_hf(out)), _logits(model), rtol=0, atol=1e-5)


@needs_ct
def test_reads_llmcompressor_checkpoint_with_reference_logits(tmp_path):
    reference = torch.load(FIXTURE / "reference_logits.pt", weights_only=True)
    model, tokenizer = holdall.load_model(FIXTURE, dtype=None)  # stored dtype: bfloat16
    assert tokenizer is not None
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {m.scheme.label for m in layers} == {"int4-g64-sym-bf16"}
    # the logits llm-compressor's environment (transformers 5.17 + compressed-tensors 0.19) computed
    assert torch.equal(_logits(model, reference["ids"]), reference["logits"])
    # and what this environment's transformers computes
    assert torch.equal(_logits(model, reference["ids"]), _logits(_hf(FIXTURE), reference["ids"]))
    # re-exported by holdall: the same tensors, byte for byte, as llm-compressor wrote
    from safetensors.torch import load_file

    out = export_compressed_tensors(model, tmp_path / "again")
    theirs, ours = load_file(str(FIXTURE / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name


@needs_ct
def test_sharded_export(tmp_path):
    model = _quantized(bits=4, group_size=32)
    out = export_compressed_tensors(model, tmp_path / "ct", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    back, _ = holdall.load_model(out)
    assert torch.equal(_logits(back), _logits(model))
    torch.testing.assert_close(_logits(_hf(out)), _logits(model), rtol=0, atol=1e-5)


def test_refusals_name_cause_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="not holdall-quantized"):
        export_compressed_tensors(make_tiny_llama(), tmp_path / "a")
    nf4 = quantize(make_tiny_llama(), QuantConfig.for_method("nf4"), progress=False)
    with pytest.raises(ConfigError, match=r"nf4 codebook.*int scheme"):
        export_compressed_tensors(nf4, tmp_path / "b")
    dq = _quantized(bits=4, group_size=32, double_quant=True)
    with pytest.raises(ConfigError, match="double-quantized"):
        export_compressed_tensors(dq, tmp_path / "c")
    partial = _quantized(bits=4, group_size=48)  # 64 columns = 1.33 groups
    with pytest.raises(ConfigError, match=r"partial.*--group-size 32"):
        export_compressed_tensors(partial, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    ok = _quantized(bits=4, group_size=32)
    export_compressed_tensors(ok, tmp_path / "e")
    with pytest.raises(ConfigError, match="already exists"):
        export_compressed_tensors(ok, tmp_path / "e")
    with pytest.raises(ConfigError, match="unknown checkpoint format"):
        export_checkpoint(ok, tmp_path / "f", format="exl2")


def test_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model = _quantized(bits=4, group_size=32)
    export_compressed_tensors(model, tmp_path / "ct")
    before = sorted(p.name for p in (tmp_path / "ct").iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, tmp_path / "ct", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no half-written directory, no temp left


def test_reader_refuses_what_holdall_cannot_hold(tmp_path):
    model = _quantized(bits=4, group_size=32)
    out = export_compressed_tensors(model, tmp_path / "ct")
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="activations"):
        holdall.load_model(out)
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    config["quantization_config"]["format"] = "float-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="pack-quantized"):
        holdall.load_model(out)


def test_load_model_without_formats_says_how(tmp_path, monkeypatch):
    from holdall.models import loading

    out = export_compressed_tensors(_quantized(bits=4, group_size=32), tmp_path / "ct")
    monkeypatch.setattr(loading, "_QUANTIZED_READERS", {})
    with pytest.raises(UnsupportedModelError, match=r"holdall\.formats"):
        loading.load_model(out)
