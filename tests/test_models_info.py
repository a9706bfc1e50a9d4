"""model_info / format_info checked against counts made by hand from the modules."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from holdall.models import format_info, load_model, model_info, save_hf


def _hand_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("tie", [False, True])
def test_float_model_counts(tie):
    model = make_tiny_llama(tie=tie)
    info = model_info(model)
    params = info["parameters"]
    assert params["total"] == sum(p.numel() for p in model.parameters())  # parameters() de-duplicates ties
    assert params["embedding"] == 128 * 64
    assert params["lm_head"] == (0 if tie else 128 * 64)
    assert params["tied_embeddings"] == tie
    assert params["decoder"] == params["total"] - params["embedding"] - params["lm_head"]
    assert info["memory_bytes"] == _hand_bytes(model)
    assert info["quantization"] is None and info["disk_bytes"] is None
    assert (info["model_type"], info["architecture"], info["num_layers"]) == ("llama", "LlamaForCausalLM", 2)


def test_quantized_model_counts_packed_bytes():
    algorithms = pytest.importorskip("holdall.algorithms")
    from holdall.core.linear import QuantLinear

    float_model = make_tiny_llama()
    model = algorithms.quantize(make_tiny_llama(), algorithms.QuantConfig.for_method("rtn", bits=4, group_size=32),
                                progress=False)
    info = model_info(model)
    # logical parameters are unchanged by quantization
    assert info["parameters"]["total"] == sum(p.numel() for p in float_model.parameters())
    assert info["memory_bytes"] == _hand_bytes(model) < _hand_bytes(float_model)

    quant = info["quantization"]
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant["method"] == "rtn" and quant["layers"] == len(layers) == 14
    assert quant["weights"] == sum(m.in_features * m.out_features for m in layers)
    assert quant["packed_bytes"] == sum(m.quantized_weight.nbytes for m in layers)
    assert quant["bits_per_weight"] == pytest.approx(layers[0].bits_per_weight)
    assert quant["bits_per_weight"] == pytest.approx(4 + 16 / 32)  # int4 codes + one fp16 scale per 32
    assert len(quant["schemes"]) == 1 and quant["schemes"][0]["layers"] == 14
    text = format_info(info)
    assert "rtn: 14 layers" in text and "int4-g32-sym" in text and "4.500 bits/weight" in text


def test_info_by_name_matches_the_loaded_model_without_loading_it(tmp_path):
    directory = save_hf(make_tiny_llama(tie=True), None, tmp_path / "m")
    by_name = model_info(str(directory))
    model, _ = load_model(directory)
    loaded = model_info(model)
    assert by_name["parameters"] == loaded["parameters"]
    assert by_name["memory_bytes"] == loaded["memory_bytes"]
    assert by_name["disk_bytes"] == loaded["disk_bytes"] == sum(p.stat().st_size for p in directory.iterdir())
    assert by_name["weights_disk_bytes"] == (directory / "model.safetensors").stat().st_size
    assert by_name["source"]["kind"] == "hf_dir"

    half = model_info(str(directory), dtype=torch.bfloat16)
    assert half["bytes_by_dtype"]["bfloat16"] == 2 * by_name["parameters"]["total"]


def test_format_info_lines(tmp_path):
    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    text = format_info(model_info(str(directory)))
    for label in ("model", "architecture", "parameters", "memory", "on disk", "quantization"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "LlamaForCausalLM (llama), 2 layers, hidden 64, vocab 128" in text
    assert "quantization  none" in text


def test_info_by_name_checks_the_weight_files(tmp_path):
    from holdall.errors import CorruptFileError

    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        model_info(str(directory))


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="model_info takes"):
        model_info(42)
