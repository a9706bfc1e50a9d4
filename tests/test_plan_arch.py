"""Architecture loading and exact parameter counts, checked against transformers models themselves."""

from __future__ import annotations

import json

import pytest
import torch

from holdall.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from holdall.planning import (
    PRESETS,
    ArchSpec,
    arch_from_config,
    count_params,
    load_arch,
    lora_trainable_params,
    preset_names,
)

transformers = pytest.importorskip("transformers")


def _numel_on_meta(model_cls, config) -> int:
    """Independent reference: build the real transformers model without allocating and count."""
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def _hf_config(preset: dict):
    fields = {k: v for k, v in preset.items() if k not in ("source", "nominal_params", "model_type", "name")}
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[preset["model_type"]]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[preset["model_type"]]
    return cls(**fields), model_cls


# Published totals (model cards / sum of numel of the released checkpoints).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "qwen2-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_counts_match_published(name):
    assert count_params(load_arch(name)).total == PUBLISHED[name]


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "mistral-7b", "qwen2-7b", "smollm2-135m"])
def test_preset_counts_match_transformers_on_meta(name):
    config, model_cls = _hf_config(PRESETS[name])
    assert count_params(load_arch(name)).total == _numel_on_meta(model_cls, config)


TINY = [
    # (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    (64, 160, 2, 4, 4, 101, False),  # MHA, untied
    (64, 160, 3, 8, 2, 101, True),  # GQA 4:1, tied
    (96, 256, 2, 6, 1, 77, False),  # MQA
    (48, 128, 1, 3, 3, 50, True),
]


@pytest.mark.parametrize("hidden,inter,layers,heads,kv,vocab,tied", TINY)
def test_tiny_llama_counts_match_instantiated_model(hidden, inter, layers, heads, kv, vocab, tied):
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config)
    reference = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    arch = arch_from_config(config)
    counts = count_params(arch)
    assert counts.total == reference
    assert counts.lm_head == (0 if tied else vocab * hidden)
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "layers." in n)
    assert counts.decoder_linears == linears


def test_bias_variants_match_instantiated_models():
    qwen = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=90)
    assert count_params(arch_from_config(qwen)).total == _numel_on_meta(transformers.Qwen2ForCausalLM, qwen)
    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=90,
                                     attention_bias=True, mlp_bias=True)
    assert count_params(arch_from_config(llama)).total == _numel_on_meta(transformers.LlamaForCausalLM, llama)


def test_lora_trainable_matches_anchor_and_peft_formula():
    arch = load_arch("llama-2-7b")
    assert lora_trainable_params(arch, 16, "all-linear") == 39_976_960  # reference/anchors.md
    assert lora_trainable_params(arch, 8, ["q_proj", "v_proj"]) == 4_194_304  # reference/peft.md


def test_lora_trainable_matches_wrapping_real_linears():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=50)
    model = transformers.LlamaForCausalLM(config)
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "layers." in n)
    assert lora_trainable_params(arch_from_config(config), r) == expected


def test_smollm2_tied_embeddings():
    arch = load_arch("SmolLM2-135M")
    assert arch.tied_embeddings and count_params(arch).lm_head == 0
    assert arch.hidden == 576 and arch.kv_heads == 3 and arch.head_dim == 64


def test_arch_from_config_json_file_and_dir(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=90)
    config.save_pretrained(tmp_path)
    from_dir = load_arch(tmp_path)
    from_file = load_arch(str(tmp_path / "config.json"))
    assert from_dir == from_file
    assert (from_dir.hidden, from_dir.kv_heads, from_dir.vocab) == (64, 2, 90)
    assert count_params(from_dir).total == sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())


def test_arch_from_transformers_config_object():
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, vocab_size=90)
    arch = load_arch(config)
    assert arch.model_type == "mistral" and arch.kv_heads == 1 and arch.head_dim == 16


def test_arch_from_gguf_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(160)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(512)
    writer.add_vocab_size(90)
    writer.add_tensor("token_embd.weight", np.zeros((90, 64), dtype=np.float16))  # no output.weight: tied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    arch = load_arch(path)
    assert (arch.hidden, arch.intermediate, arch.layers, arch.heads, arch.kv_heads) == (64, 160, 2, 4, 2)
    assert arch.vocab == 90 and arch.max_position == 512 and arch.tied_embeddings
    assert arch.name == "tiny-llama"


def test_bad_specs_name_cause_and_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="llama-2-7b"):  # lists the presets
        load_arch("not-a-model")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_arch(str(tmp_path / "missing" / "config.json"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_arch(tmp_path)  # empty directory
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptFileError, match="JSON"):
        load_arch(bad)
    with pytest.raises(ConfigError, match="intermediate_size"):
        arch_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "vocab_size": 10})
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        arch_from_config({"model_type": "gpt2", "hidden_size": 64})
    with pytest.raises(ConfigError, match="multiple"):
        ArchSpec("x", 64, 128, 2, heads=6, kv_heads=4, head_dim=16, vocab=10, tied_embeddings=False)
    with pytest.raises(ConfigError, match="all-linear"):
        lora_trainable_params(load_arch("llama-2-7b"), 16, ["qkv_proj"])


def test_hub_id_offline_error_lists_presets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        transformers.AutoConfig, "from_pretrained",
        classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(OSError("offline"))),
    )
    with pytest.raises(ModelNotFoundError) as err:
        load_arch("someone/some-model")
    assert "offline" in str(err.value) and "llama-2-7b" in str(err.value)


def test_presets_are_all_loadable_and_aliases_work():
    for name in preset_names():
        assert load_arch(name).name == name
    assert load_arch("Llama2-7B") == load_arch("llama-2-7b")
    assert load_arch("meta-llama/Llama-2-7b-hf") == load_arch("llama-2-7b")  # known hub id: no network


def test_preset_json_roundtrip(tmp_path):
    # a preset written as config.json plans the same as the preset itself
    fields = {k: v for k, v in PRESETS["llama-3-8b"].items() if k not in ("source", "nominal_params")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert count_params(load_arch(tmp_path)) == count_params(load_arch("llama-3-8b"))
