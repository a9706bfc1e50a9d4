"""Every supported family, as a tiny random model: its recorded layout matches the real modules, and it
survives save_hf (plain transformers reload) and a quantized save/load with identical logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from holdall.errors import UnsupportedModelError
from holdall.models import check_supported, decoder_linear_names, get_family, save_hf, supported_model_types
from holdall.models.families import is_tied, model_type_from_gguf, split_layer_name

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=128)
IDS = torch.tensor([[1, 5, 9, 20, 33, 70, 2]])


def _config(model_type: str):
    import transformers

    cls = transformers.AutoConfig.for_model(model_type).__class__
    extra = {"head_dim": 16} if model_type in ("gemma", "gemma2", "qwen3") else {}
    if model_type == "phi3":
        extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # its defaults assume a 32k vocab
    return cls(**SMALL, **extra)


def _tiny(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(model_type)).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_supported_list():
    assert supported_model_types()[:3] == ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("model_type", supported_model_types())
def test_family_layout_matches_the_real_modules(model_type):
    model = _tiny(model_type)
    family = check_supported(model.config)
    modules = dict(model.named_modules())
    names = decoder_linear_names(model)
    assert len(names) == SMALL["num_hidden_layers"] * len(family.decoder_linears)
    assert all(isinstance(modules[n], nn.Linear) for n in names)
    # ...and they are exactly the block linears transformers built
    block_linears = {n for n, m in modules.items() if isinstance(m, nn.Linear) and n.startswith(family.layers_path)}
    assert set(names) == block_linears
    for i in range(SMALL["num_hidden_layers"]):
        for norm in family.block_norms:
            assert f"{family.layers_path}.{i}.{norm}" in modules
    assert modules[family.embed_path] is model.get_input_embeddings()
    assert modules[family.head_path] is model.get_output_embeddings()
    assert family.final_norm_path in modules
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert is_tied(model.config) == tied
    assert split_layer_name(names[-1]) == (SMALL["num_hidden_layers"] - 1, family.decoder_linears[-1])


@pytest.mark.parametrize("model_type", supported_model_types())
def test_family_save_hf_reloads_identically(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    model = _tiny(model_type)
    reloaded = AutoModelForCausalLM.from_pretrained(str(save_hf(model, None, tmp_path / model_type))).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


@pytest.mark.parametrize("model_type", supported_model_types())
def test_family_quantized_round_trip(tmp_path, model_type):
    algorithms = pytest.importorskip("holdall.algorithms")
    from holdall.models.checkpoint import load_quantized, save_quantized

    model = algorithms.quantize(_tiny(model_type), algorithms.QuantConfig.for_method("rtn", group_size=32),
                                progress=False)
    assert set(model.holdall_quant["layers"]) == set(decoder_linear_names(model))
    loaded, _ = load_quantized(save_quantized(model, None, tmp_path / model_type))
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "t5", "mixtral"])
def test_unsupported_configs(model_type):
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError) as err:
        check_supported(config)
    text = str(err.value)
    assert model_type in text and "llama" in text and "Supported" in text


def test_moe_variant_of_a_dense_type_is_refused():
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        check_supported({"model_type": "llama", "num_local_experts": 8})


def test_dict_configs_and_get_family():
    assert get_family({"model_type": "qwen2"}).model_type == "qwen2"
    assert get_family("phi3").attention_linears == ("self_attn.qkv_proj", "self_attn.o_proj")
    assert decoder_linear_names({"model_type": "llama", "num_hidden_layers": 1})[0] == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("arch, model_type", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                              ("phi3", "phi3"), ("gemma2", "gemma2")])
def test_gguf_architectures(arch, model_type):
    assert model_type_from_gguf(arch) == model_type


def test_unknown_gguf_architecture():
    with pytest.raises(UnsupportedModelError, match="'mamba'.*llama"):
        model_type_from_gguf("mamba")
