"""GPTQ v1 export/import: an independent unpacker (written here from the published v1 layout, word by word, not from
holdall's stream code), round trips at 2/3/4/8 bits, and refusals of what v1 cannot hold.

benchmarks/verify_gptq_autogptq.py additionally checks the export against AutoGPTQ's own pack() and torch
dequantization (bit-identical at 2/3/4/8 bits, sym and asym); it runs here when HOLDALL_AUTOGPTQ_PKG points at the
unpacked AutoGPTQ 0.7.1 wheel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import holdall
from holdall.algorithms import QuantConfig, quantize
from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError, UnsupportedModelError
from holdall.formats.gptq import export_gptq

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5, 30], [2, 8, 8, 15, 40, 0, 33, 6]])


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _quantized(model=None, **scheme):
    return quantize(model or make_tiny_llama(), QuantConfig.for_method("rtn", **scheme), progress=False)


# --- an independent reader of the v1 layout ------------------------------------------------------------------


def _word_codes(words: list[int], bits: int) -> list[int]:
    """The codes of one group of packed words, as AutoGPTQ's packer lays them out.

    2/4/8 bits: 32/bits codes per word, code k at bit bits*k. 3 bits: three words hold 32 codes: codes 0..9 at
    bits 3k of word 0; code 10 has its low two bits at 30..31 of word 0 and its high bit at bit 0 of word 1;
    codes 11..20 at bits 3k+1 of word 1; code 21 has its low bit at bit 31 of word 1 and its high two bits at
    bits 0..1 of word 2; codes 22..31 at bits 3k+2 of word 2.
    """
    w = [x & 0xFFFFFFFF for x in words]
    if bits in (2, 4, 8):
        return [(w[0] >> (bits * k)) & (2**bits - 1) for k in range(32 // bits)]
    assert bits == 3 and len(w) == 3
    codes = [(w[0] >> (3 * k)) & 7 for k in range(10)]
    codes.append(((w[0] >> 30) & 3) | ((w[1] & 1) << 2))
    codes += [(w[1] >> (3 * k + 1)) & 7 for k in range(10)]
    codes.append(((w[1] >> 31) & 1) | ((w[2] & 3) << 1))
    codes += [(w[2] >> (3 * k + 2)) & 7 for k in range(10)]
    return codes


def _unpack_along(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, W] packed along W -> int [rows, W*32/bits]."""
    step = 3 if bits == 3 else 1
    rows = []
    for row in packed.tolist():
        codes = []
        for i in range(0, len(row), step):
            codes += _word_codes(row[i : i + step], bits)
        rows.append(codes)
    return torch.tensor(rows, dtype=torch.int64)


def independent_dequantize(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """W [out, in] = scales[g_idx] * (q - (qzeros + 1)[g_idx]) from the v1 tensors."""
    q = _unpack_along(qweight.T.contiguous(), bits)  # qweight is packed along the input dim (its rows)
    zeros = _unpack_along(qzeros, bits) + 1  # [G, out], v1 stores zero - 1
    g = g_idx.long()
    return ((q - zeros[g].T).float() * scales.float()[g].T).float()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_export_matches_independent_unpacker_and_round_trips(tmp_path, bits, symmetric):
    from safetensors.torch import load_file

    model = _quantized(bits=bits, group_size=32, symmetric=symmetric)
    out = export_gptq(model, tmp_path / "gptq", make_tiny_tokenizer())
    stored = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert stored[f"{name}.qweight"].shape == (layer.in_features * bits // 32, layer.out_features)
        assert stored[f"{name}.scales"].dtype == torch.float16
        weight = independent_dequantize(stored[f"{name}.qweight"], stored[f"{name}.qzeros"], stored[f"{name}.scales"],
                                        stored[f"{name}.g_idx"], bits)
        assert torch.equal(weight, layer.dequantize_weight(torch.float32)), name
    back, tokenizer = holdall.load_model(out)
    assert tokenizer is not None
    assert back.holdall_quant["layers"] == model.holdall_quant["layers"]  # symmetric recognised from the zeros
    for name in model.holdall_quant["layers"]:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(b, QuantLinear)
        for buf in a._weight_names:
            assert torch.equal(a._buffers[buf], b._buffers[buf]), f"{name}.{buf}"
    assert torch.equal(_logits(back), _logits(model))


def test_config_files(tmp_path):
    out = export_gptq(_quantized(bits=4, group_size=64, symmetric=False), tmp_path / "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 64, "desc_act": False,
        "sym": False}
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    info = holdall.model_info(out)  # reads the packed layers, not a float description of the config
    assert info["quantization"]["layers"] == 14 and info["quantization"]["method"] == "imported:gptq"


def test_channel_scales_and_tied_embeddings(tmp_path):
    model = _quantized(make_tiny_llama(tie=True), bits=8, granularity="channel")
    out = export_gptq(model, tmp_path / "gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1
    back, _ = holdall.load_model(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(_logits(back), _logits(model))


def test_smollm2_width_needs_whole_groups(tmp_path):
    # SmolLM2-135M's hidden size: 576 columns = 4.5 groups of 128
    def smol():
        return make_tiny_llama(hidden=576, intermediate=64, layers=1, heads=9, kv_heads=3, vocab=64)

    with pytest.raises(ConfigError, match=r"576 input columns.*partial.*--group-size 64"):
        export_gptq(_quantized(smol(), bits=4, group_size=128), tmp_path / "g128")
    assert not (tmp_path / "g128").exists()
    model = _quantized(smol(), bits=4, group_size=64)
    back, _ = holdall.load_model(export_gptq(model, tmp_path / "g64"))
    assert torch.equal(_logits(back), _logits(model))


def test_refusals_name_cause_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="not holdall-quantized"):
        export_gptq(make_tiny_llama(), tmp_path / "a")
    nf4 = quantize(make_tiny_llama(), QuantConfig.for_method("nf4"), progress=False)
    with pytest.raises(ConfigError, match=r"nf4.*int scheme"):
        export_gptq(nf4, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"5-bit.*2/3/4/8"):
        export_gptq(_quantized(bits=5, group_size=32), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"bfloat16 scales.*float16"):
        export_gptq(_quantized(bits=4, group_size=32, scale_dtype="bfloat16"), tmp_path / "d")
    config = QuantConfig.for_method("rtn", bits=4, group_size=32, exclude=(r".*down_proj",))
    partial = quantize(make_tiny_llama(), config, progress=False)
    with pytest.raises(ConfigError, match=r"left in float.*compressed-tensors"):
        export_gptq(partial, tmp_path / "e")
    mixed = quantize(partial, QuantConfig.for_method("rtn", bits=8, group_size=32), progress=False, force=True)
    with pytest.raises(ConfigError, match=r"one bits/group_size.*int4-g32-sym.*int8-g32-sym"):
        export_gptq(mixed, tmp_path / "f")
    float_model = make_tiny_llama()
    with torch.no_grad():  # a group of non-negative weights: its asymmetric zero point is 0
        float_model.model.layers[0].mlp.up_proj.weight[:, :32].abs_()
    with pytest.raises(ConfigError, match=r"zero point 0.*--sym"):
        export_gptq(_quantized(float_model, bits=4, group_size=32, symmetric=False), tmp_path / "g")
    assert not any(p.name.startswith(tuple("abcdefg")) for p in tmp_path.iterdir())


def test_reader_refusals(tmp_path):
    from safetensors.torch import load_file, save_file

    out = export_gptq(_quantized(bits=4, group_size=32), tmp_path / "gptq")
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.0.self_attn.q_proj"
    good = dict(tensors)
    tensors[f"{name}.g_idx"] = tensors[f"{name}.g_idx"].flip(0)  # act-order with dynamic groups
    save_file(tensors, str(weights))
    with pytest.raises(UnsupportedModelError, match="g_idx"):
        holdall.load_model(out)
    tensors = dict(good)
    tensors[f"{name}.qzeros"] = torch.full_like(good[f"{name}.qzeros"], -1)  # every stored zero 15: zero 16 in v1
    save_file(tensors, str(weights))
    with pytest.raises(UnsupportedModelError, match="wrapped"):
        holdall.load_model(out)


@pytest.mark.skipif(not os.environ.get("HOLDALL_AUTOGPTQ_PKG"), reason="set HOLDALL_AUTOGPTQ_PKG to the unpacked "
                    "AutoGPTQ 0.7.1 wheel to compare with AutoGPTQ itself")
def test_against_autogptq():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_gptq_autogptq.py"
    spec = importlib.util.spec_from_file_location("verify_gptq_autogptq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(os.environ["HOLDALL_AUTOGPTQ_PKG"]) == 0


def test_cli_quantize_format(tmp_path, tiny_llama_dir, capsys):
    from holdall.cli.main import main

    out = tmp_path / "gptq"
    assert main(["quantize", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--format", "gptq",
                 "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    model, tokenizer = holdall.load_model(out)
    assert tokenizer is not None and isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    capsys.readouterr()
    # refused before quantizing: the format cannot hold the scheme
    assert main(["quantize", str(tiny_llama_dir), "--bits", "3", "--format", "awq", "-o", str(tmp_path / "awq")]) == 2
    assert "3-bit" in capsys.readouterr().err and not (tmp_path / "awq").exists()
    assert main(["quantize", str(tiny_llama_dir), "--method", "nf4", "--format", "compressed-tensors",
                 "-o", str(tmp_path / "ct")]) == 2
    assert "nf4" in capsys.readouterr().err
