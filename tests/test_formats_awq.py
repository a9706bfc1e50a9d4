"""AWQ GEMM export/import: an independent unpacker (from AutoAWQ's published order_map), compressed-tensors' own
AutoAWQ converter + transformers as a second independent reader, round trips and refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import holdall
from holdall.algorithms import QuantConfig, quantize
from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError
from holdall.formats.awq import export_awq

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5, 30], [2, 8, 8, 15, 40, 0, 33, 6]])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of each int32 holds output channel AWQ_ORDER[k] of its block of 8


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _quantized(model=None, **scheme):
    return quantize(model or make_tiny_llama(), QuantConfig.for_method("rtn", **scheme), progress=False)


def independent_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out/8] -> int [rows, out]: nibble k of word c is channel 8c + AWQ_ORDER[k]."""
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for c in range(words):
        word = packed[:, c].to(torch.int64) & 0xFFFFFFFF
        for k in range(8):
            out[:, 8 * c + AWQ_ORDER[k]] = (word >> (4 * k)) & 0xF
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_export_matches_independent_unpacker_and_round_trips(tmp_path, symmetric):
    from safetensors.torch import load_file

    model = _quantized(bits=4, group_size=32, symmetric=symmetric)
    out = export_awq(model, tmp_path / "awq", make_tiny_tokenizer())
    stored = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        q = independent_unpack(stored[f"{name}.qweight"])  # [in, out]
        z = independent_unpack(stored[f"{name}.qzeros"])  # [G, out]
        s = stored[f"{name}.scales"]
        assert s.dtype == torch.float16 and q.shape == (layer.in_features, layer.out_features)
        g = torch.arange(layer.in_features) // 32
        weight = ((q - z[g]).float() * s.float()[g]).T  # W = (q - zero) * scale per group
        assert torch.equal(weight, layer.dequantize_weight(torch.float32)), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    keys = ("quant_method", "version", "zero_point", "bits", "group_size", "w_bit", "q_group_size")
    assert {k: qc[k] for k in keys} == {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "group_size": 32, "w_bit": 4,
            "q_group_size": 32}
    back, tokenizer = holdall.load_model(out)
    assert tokenizer is not None
    assert back.holdall_quant["layers"] == model.holdall_quant["layers"]
    for name in model.holdall_quant["layers"]:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(b, QuantLinear)
        for buf in a._weight_names:
            assert torch.equal(a._buffers[buf], b._buffers[buf]), f"{name}.{buf}"
    assert torch.equal(_logits(back), _logits(model))


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="pip install compressed-tensors")
def test_compressed_tensors_autoawq_converter_reads_export(tmp_path):
    """compressed-tensors ships a converter from AutoAWQ GEMM checkpoints; transformers then loads its output."""
    from compressed_tensors.entrypoints.convert import AutoAWQConverter, convert_checkpoint
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _quantized(make_tiny_llama(tie=True), bits=4, group_size=16, symmetric=False)
    awq = export_awq(model, tmp_path / "awq")
    converted = tmp_path / "ct"
    converter = AutoAWQConverter.from_pretrained(str(awq))
    convert_checkpoint(str(awq), str(converted), converter, max_workers=1, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(
        str(converted), quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    for name in model.holdall_quant["layers"]:
        # dequantized in the float16 scale dtype: holdall's weight rounded to float16
        expected = model.get_submodule(name).dequantize_weight(torch.float32).half().float()
        assert torch.equal(hf.get_submodule(name).weight.float(), expected), name
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=2e-3)


def test_refusals_name_cause_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="not holdall-quantized"):
        export_awq(make_tiny_llama(), tmp_path / "a")
    nf4 = quantize(make_tiny_llama(), QuantConfig.for_method("nf4"), progress=False)
    with pytest.raises(ConfigError, match=r"nf4 codebook.*--method rtn/gptq --bits 4"):
        export_awq(nf4, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"3-bit.*4-bit.*--bits 4"):
        export_awq(_quantized(bits=3, group_size=32), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"granularity 'channel'.*--granularity group"):
        export_awq(_quantized(bits=4, granularity="channel"), tmp_path / "d")
    with pytest.raises(ConfigError, match=r"whole groups of 48.*--group-size 32"):
        export_awq(_quantized(bits=4, group_size=48), tmp_path / "e")
    with pytest.raises(ConfigError, match=r"float32 scales.*float16"):
        export_awq(_quantized(bits=4, group_size=32, scale_dtype="float32"), tmp_path / "f")
    assert not list(tmp_path.iterdir())
