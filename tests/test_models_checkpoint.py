"""save_quantized / load_quantized: bit-identical round trips, packed size on disk, strict loading, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from holdall.algorithms import QuantConfig, quantize
from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError, CorruptFileError, UnsupportedModelError
from holdall.models.checkpoint import load_quantized, read_manifest, save_quantized
from holdall.models import load_model, model_info, resolve_model, save_hf

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5, 30]])
INT4 = QuantConfig.for_method("rtn", bits=4, group_size=32)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _quantized(config=INT4, **kw):
    return quantize(make_tiny_llama(**kw), config, progress=False)


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize(
    "config",
    [
        INT4,
        QuantConfig.for_method("rtn", bits=3, group_size=16, symmetric=False),
        QuantConfig.for_method("rtn", bits=8, granularity="channel"),
        QuantConfig.for_method("nf4", double_quant=True),
    ],
    ids=lambda c: c.label,
)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_identical(tmp_path, config, tie):
    model = _quantized(config, tie=tie)
    out = save_quantized(model, make_tiny_tokenizer(), tmp_path / "q")
    loaded, tokenizer = load_quantized(out)
    assert torch.equal(_logits(loaded), _logits(model))
    assert tokenizer is not None
    assert loaded.holdall_quant["layers"] == model.holdall_quant["layers"]
    assert loaded.holdall_quant["config"] == config.to_dict()
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_round_trip_qwen2_with_qkv_bias(tmp_path):
    model = quantize(_tiny_qwen2(), INT4, progress=False)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    loaded, _ = load_quantized(save_quantized(model, None, tmp_path / "q"))
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None


def test_quantized_head_of_a_tied_model(tmp_path):
    config = QuantConfig.for_method("rtn", targets=("proj", "lm_head"), group_size=32)
    model = quantize(make_tiny_llama(tie=True), config, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    loaded, _ = load_quantized(save_quantized(model, None, tmp_path / "q"))
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(_logits(loaded), _logits(model))


def test_bf16_model_keeps_its_dtypes(tmp_path):
    # Loaded the way users get a bf16 model (not .to(bf16), which also rounds the fp32 rotary tables that
    # are never saved and so cannot survive any save/load).
    model, _ = load_model(save_hf(make_tiny_llama(), None, tmp_path / "float"), dtype=torch.bfloat16)
    quantize(model, INT4, progress=False)
    loaded, _ = load_quantized(save_quantized(model, None, tmp_path / "q"))
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), _logits(model))


def test_layout_and_manifest(tmp_path):
    model = _quantized(tie=True)
    out = save_quantized(model, make_tiny_tokenizer(), tmp_path / "q")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "holdall_model.safetensors", "holdall_quant.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # plain transformers must not take it for a float checkpoint
    manifest = read_manifest(out)
    assert manifest["format"] == "holdall-quant" and manifest["format_version"] == 1
    assert manifest["config"] == INT4.to_dict()
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"] == INT4.scheme.to_dict()
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["holdall_version"]

    from safetensors import safe_open

    with safe_open(str(out / "holdall_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.qdata" in keys and "model.layers.0.mlp.up_proj.scale" in keys
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    assert "lm_head.weight" not in keys  # tied: stored once


def test_packed_weights_are_small_on_disk(tmp_path):
    model = _quantized(hidden=128, vocab=64)
    float_dir = save_hf(make_tiny_llama(hidden=128, vocab=64), None, tmp_path / "float")
    quant_dir = save_quantized(model, None, tmp_path / "q")

    from safetensors import safe_open

    def linear_bytes(path: Path, layers) -> int:
        name = "holdall_model.safetensors" if (path / "holdall_quant.json").exists() else "model.safetensors"
        with safe_open(str(path / name), "pt") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[0] in layers)

    layers = set(model.holdall_quant["layers"])
    ratio = linear_bytes(float_dir, layers) / linear_bytes(quant_dir, layers)
    assert ratio > 6.5  # fp32 (32 bits) vs int4 g32 with fp16 scales (4.5 bits): ~7.1x
    assert (quant_dir / "holdall_model.safetensors").stat().st_size < 0.45 * (float_dir / "model.safetensors").stat().st_size


def test_load_model_and_model_info_dispatch_on_holdall_dirs(tmp_path):
    model = _quantized(tie=True)
    out = save_quantized(model, make_tiny_tokenizer(), tmp_path / "q")
    assert resolve_model(out).kind == "holdall"
    loaded, tokenizer = load_model(out)
    assert torch.equal(_logits(loaded), _logits(model)) and tokenizer is not None
    info = model_info(str(out))
    assert info["quantization"]["layers"] == 14
    assert info["parameters"]["total"] == sum(p.numel() for p in make_tiny_llama(tie=True).parameters())
    assert info["disk_bytes"] == sum(p.stat().st_size for p in out.iterdir())


# --- refusals and corrupt checkpoints -------------------------------------------------------------------


def test_refuses_a_float_model(tmp_path):
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(make_tiny_llama(), None, tmp_path / "q")


def test_refuses_existing_directory_unless_overwrite(tmp_path):
    model = _quantized()
    out = save_quantized(model, None, tmp_path / "q")
    with pytest.raises(ConfigError, match="overwrite"):
        save_quantized(model, None, out)
    save_quantized(model, None, out, overwrite=True)


def test_failed_save_leaves_nothing_behind(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise RuntimeError("disk full")

    model = _quantized()
    with pytest.raises(RuntimeError):
        save_quantized(model, BrokenTokenizer(), tmp_path / "q")
    assert not (tmp_path / "q").exists()

    good = save_quantized(model, None, tmp_path / "q")
    before = sorted(p.name for p in good.iterdir())
    with pytest.raises(RuntimeError):
        save_quantized(model, BrokenTokenizer(), good, overwrite=True)
    assert sorted(p.name for p in good.iterdir()) == before  # the previous checkpoint is intact
    load_quantized(good)


def _rewrite_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "holdall_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "holdall_model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.scale"), "lacks tensor.*model.layers.1.mlp.down_proj.scale"),
        (lambda t: t.__setitem__("model.layers.0.extra", torch.zeros(2)), "unexpected tensor.*model.layers.0.extra"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.qdata", torch.zeros(3, 3, dtype=torch.uint8)),
         "model.layers.0.mlp.up_proj.qdata.*shape"),
        (lambda t: t.__setitem__("model.norm.weight", torch.zeros(7)), "model.norm.weight.*shape"),
    ],
    ids=["missing", "extra", "qdata-shape", "float-shape"],
)
def test_strict_loading_names_the_tensor(tmp_path, edit, message):
    out = save_quantized(_quantized(), None, tmp_path / "q")
    _rewrite_weights(out, edit)
    with pytest.raises(CorruptFileError, match=message):
        load_quantized(out)


def test_wrong_buffer_dtype_is_corrupt(tmp_path):
    out = save_quantized(_quantized(), None, tmp_path / "q")
    key = "model.layers.0.mlp.up_proj.scale"
    _rewrite_weights(out, lambda t: t.__setitem__(key, t[key].float()))
    with pytest.raises(CorruptFileError, match=key):
        load_quantized(out)


def test_truncated_weights(tmp_path):
    out = save_quantized(_quantized(), None, tmp_path / "q")
    weights = out / "holdall_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_model(out)


def test_manifest_problems(tmp_path):
    out = save_quantized(_quantized(), None, tmp_path / "q")
    path = out / "holdall_quant.json"
    manifest = json.loads(path.read_text())

    path.write_text("{oops")
    with pytest.raises(CorruptFileError, match="holdall_quant.json"):
        load_quantized(out)

    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UnsupportedModelError, match="pip install -U holdall"):
        load_quantized(out)

    layers = dict(manifest["layers"])
    layers["model.layers.0.mlp.act_fn"] = layers.pop("model.layers.0.mlp.up_proj")
    path.write_text(json.dumps({**manifest, "layers": layers}))
    with pytest.raises(CorruptFileError, match="act_fn"):
        load_quantized(out)


def test_plain_transformers_refuses_a_holdall_directory(tmp_path):
    """Loading a quantized directory as a float model must fail loudly, not initialise linears at random."""
    from transformers import AutoModelForCausalLM

    out = save_quantized(_quantized(), None, tmp_path / "q")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
