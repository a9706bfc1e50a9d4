"""The PEFT adapter format both ways, checked against the real peft package on tiny random Llamas:
holdall saves -> peft.PeftModel.from_pretrained gives holdall's logits; peft saves -> holdall load_adapter gives
peft's logits; adapters for another base are refused with that base named."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from holdall.errors import ConfigError, UnsupportedModelError
from holdall.tuners.lora import (
    LoraConfig,
    adapter_rows,
    add_lora,
    load_adapter,
    lora_layers,
    save_adapter,
    set_adapter,
)

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8], [4, 4, 8, 1, 0, 6, 3]])


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _randomize(named_params, seed):
    """Non-zero values for every LoRA A/B (B starts at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_params:
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def _peft_load(base, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter_dir))


# --- holdall -> peft -------------------------------------------------------------------------------------
HOLDALL_CASES = {
    "names": (LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), False),
    "all-linear-rslora": (LoraConfig(r=8, alpha=4, targets="all-linear", use_rslora=True, dropout=0.1), False),
    "regex-layer0-only": (LoraConfig(r=2, alpha=6, targets=r"re:model\.layers\.0\.(self_attn\.o_proj|mlp\.up_proj)"),
                          False),
    "modules-to-save-tied": (LoraConfig(r=4, alpha=8, targets=("k_proj",), modules_to_save=("lm_head",)), True),
}


@pytest.mark.parametrize("case", list(HOLDALL_CASES))
def test_holdall_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    config, tie = HOLDALL_CASES[case]
    base = make_tiny_llama(tie=tie)
    model = copy.deepcopy(base)
    add_lora(model, config)
    _randomize(model.named_parameters(), seed=11)
    if config.modules_to_save:
        with torch.no_grad():
            model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours = _logits(model)
    assert (ours - _logits(base)).abs().max() > 1e-2  # the adapter matters

    save_adapter(model, tmp_path / "adapter")
    target_modules = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    # a name list would make peft wrap both layers; an exact regex keeps it to layer 0
    assert isinstance(target_modules, str) == (case == "regex-layer0-only")
    theirs = _logits(_peft_load(copy.deepcopy(base), tmp_path / "adapter"))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_saved_files_follow_peft_format(tmp_path):
    model = make_tiny_llama()
    model.name_or_path = "org/tiny-llama"
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.05, targets=("v_proj", "q_proj")))
    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "holdall_adapter.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_rslora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": "org/tiny-llama",
        "revision": None, "inference_mode": True, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                    for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    meta = json.loads((out / "holdall_adapter.json").read_text())
    assert meta["base"] == {"name": "org/tiny-llama", "model_type": "llama", "hidden_size": 64,
                            "num_hidden_layers": 2, "vocab_size": 128}
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == [64, 64]


# --- peft -> holdall -------------------------------------------------------------------------------------
PEFT_CASES = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "regex": dict(r=4, lora_alpha=16, target_modules=r".*layers\.1\.mlp\.(gate|down)_proj"),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1),
    "rslora": dict(r=16, lora_alpha=8, target_modules=["o_proj", "up_proj"], use_rslora=True),
    "rank-pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2}),
    "modules-to-save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def _peft_adapter(case, out_dir, tie=False, seed=0):
    base = make_tiny_llama(tie=tie, seed=seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CASES[case]))
    _randomize(model.named_parameters(), seed=21)
    if "modules_to_save" in PEFT_CASES[case]:
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.0)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return base, _logits(model)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_holdall_with_same_logits(case, tmp_path):
    base, theirs = _peft_adapter(case, tmp_path / "peft")
    assert not (tmp_path / "peft" / "holdall_adapter.json").exists()
    ours_model = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (theirs - _logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours_model), theirs, rtol=1e-4, atol=1e-5)
    # inference load: nothing trainable
    assert not any(p.requires_grad for n, p in ours_model.named_parameters() if "lora_" in n)


def test_peft_adapter_round_trips_through_holdall(tmp_path):
    """peft -> holdall -> save -> peft: the same logits at both ends (rank_pattern survives)."""
    base, theirs = _peft_adapter("rank-pattern", tmp_path / "peft")
    model = load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    save_adapter(model, tmp_path / "again")
    again = _logits(_peft_load(copy.deepcopy(base), tmp_path / "again"))
    torch.testing.assert_close(again, theirs, rtol=1e-4, atol=1e-5)


def test_two_loaded_adapters_serve_a_mixed_batch(tmp_path):
    base, logits_list = _peft_adapter("list", tmp_path / "one")
    base2, logits_rslora = _peft_adapter("rslora", tmp_path / "two")
    assert torch.equal(base.lm_head.weight, base2.lm_head.weight)  # same seed, same base
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "one", name="one")
    load_adapter(model, tmp_path / "two", name="two")
    assert [layer.active_adapters for _, layer in lora_layers(model)][0] == ("one",)  # the 2nd did not switch
    with pytest.raises(ConfigError, match="already has an adapter named 'one'"):
        load_adapter(model, tmp_path / "two", name="one")
    ids = torch.cat([IDS, IDS[:1]])  # rows: one, two, base
    with adapter_rows(model, ["one", "two", None]):
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed[0], logits_list[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits_rslora[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[2], _logits(base, IDS[:1])[0], rtol=1e-5, atol=1e-5)
    set_adapter(model, "two")
    torch.testing.assert_close(_logits(model), logits_rslora, rtol=1e-4, atol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------------
def test_holdall_adapter_on_other_hidden_size_names_its_base(tmp_path):
    model = make_tiny_llama(hidden=64)
    model.name_or_path = "org/tiny-64"
    add_lora(model, LoraConfig(r=4, targets=("q_proj",)))
    save_adapter(model, tmp_path / "adapter")
    other = make_tiny_llama(hidden=32)
    with pytest.raises(UnsupportedModelError) as err:
        load_adapter(other, tmp_path / "adapter")
    message = str(err.value)
    assert "trained for org/tiny-64 (llama, hidden 64, 2 layers, vocab 128)" in message
    assert "hidden 32" in message and "hidden_size 64 vs 32" in message
    assert not any("lora" in n for n, _ in other.named_parameters())  # refused before touching the model


def test_holdall_adapter_on_other_architecture_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = make_tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=("q_proj",)))
    save_adapter(model, tmp_path / "adapter")
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(UnsupportedModelError, match=r"trained for .*\(llama, hidden 64.*model_type llama vs qwen2"):
        load_adapter(qwen, tmp_path / "adapter")


def _named_peft_adapter(out_dir, **kw):
    base = make_tiny_llama(**kw)
    base.name_or_path = "org/tiny-64"  # what peft records as base_model_name_or_path
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(out_dir), save_embedding_layers=False)  # False: no hub lookup of the base's config
    assert json.loads((out_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-64"


def test_peft_adapter_without_fingerprint_mismatch_names_base(tmp_path):
    _named_peft_adapter(tmp_path / "peft", hidden=64)
    with pytest.raises(UnsupportedModelError, match=r"trained for org/tiny-64.*\[out 64, in 64\].*\[out 32, in 32\]"):
        load_adapter(make_tiny_llama(hidden=32), tmp_path / "peft")
    _named_peft_adapter(tmp_path / "peft3", hidden=64, layers=3)
    with pytest.raises(UnsupportedModelError, match=r"trained for org/tiny-64.*layers.2.self_attn.q_proj.*no such"):
        load_adapter(make_tiny_llama(hidden=64, layers=2), tmp_path / "peft3")


def test_non_lora_and_dora_adapters_are_refused(tmp_path):
    base = make_tiny_llama()
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj"],
                                                                   feedforward_modules=[], task_type="CAUSAL_LM"))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(UnsupportedModelError, match="'IA3' adapter; holdall loads LoRA"):
        load_adapter(copy.deepcopy(base), tmp_path / "ia3")
    dora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                                                     task_type="CAUSAL_LM"))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        load_adapter(copy.deepcopy(base), tmp_path / "dora")
