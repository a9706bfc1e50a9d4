"""Model-level LoRA on tiny random Llamas: targets, several adapters, mixed-adapter batches, modules_to_save with
tied embeddings, merge_lora, and the trainable-parameter report (checked against peft's own count)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from holdall.algorithms import quantize
from holdall.algorithms.config import QuantConfig
from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError
from holdall.tuners.lora import (
    LoraConfig,
    LoraLinear,
    adapter_rows,
    add_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge_adapters,
    merge_lora,
    select_targets,
    set_adapter,
    trainable_report,
    unmerge_adapters,
)
from holdall.tuners.lora.model import _short_count

QV = LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6], [2, 3, 5, 7, 11, 13], [9, 8, 7, 6, 5, 4]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _randomize(model, name, seed):
    """Give adapter ``name`` non-zero B (and fresh A) so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].weight.copy_(torch.randn(layer.lora_A[name].weight.shape, generator=g) * 0.2)
                layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.2)


def _manually_merged(base, lora_model, name):
    """Independent reference: a copy of the base with W += s * B @ A written by hand for adapter ``name``."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in lora_layers(lora_model):
            if name in layer.lora_A:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                ref.get_submodule(path).weight += layer.scaling[name] * B @ A
    return ref


# --- targets ---------------------------------------------------------------------------------------------
def test_target_selection_by_names_regex_and_all_linear():
    model = make_tiny_llama(layers=2)
    names = select_targets(model, ("q_proj", "v_proj"))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert select_targets(model, r"re:model\.layers\.1\..*_proj") == [
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    every = select_targets(model, "all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every
    with pytest.raises(ConfigError, match="not a linear layer"):
        select_targets(model, ("input_layernorm",))
    with pytest.raises(ConfigError, match="match no linear layer"):
        select_targets(model, ("qkv_proj",))


def test_add_lora_step_zero_equals_base_and_freezes_everything_else():
    model = make_tiny_llama()
    base_logits = _logits(model)
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * 14
    # PEFT's in-memory names, so saved keys are a prefix change away
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in dict(model.named_parameters())


def test_gradients_flow_only_to_adapter_parameters():
    model = make_tiny_llama()
    add_lora(model, QV)
    _randomize(model, "default", 0)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert with_grad == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected)


def test_bias_modes_mark_biases_trainable():
    # Llama has no biases; a small MLP makes the modes visible.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8))
    add_lora(model, LoraConfig(r=2, targets=("0",), bias="lora_only"))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n} == {"0.base_layer.bias"}
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8))
    add_lora(model, LoraConfig(r=2, targets=("0",), bias="all"))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n} == {
        "0.base_layer.bias", "2.bias", "3.bias"}


# --- several adapters ------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters():
    base = make_tiny_llama()
    model = copy.deepcopy(base)
    add_lora(model, QV, name="a")
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=("o_proj", "down_proj")), name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    return base, model


def test_switching_disabling_and_deleting(two_adapters):
    base, model = two_adapters
    ref_a = _logits(_manually_merged(base, model, "a"))
    ref_b = _logits(_manually_merged(base, model, "b"))
    base_logits = _logits(base)
    assert (ref_a - ref_b).abs().max() > 1e-2  # the adapters really differ

    set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), ref_a, rtol=1e-4, atol=1e-5)
    set_adapter(model, "b")
    torch.testing.assert_close(_logits(model), ref_b, rtol=1e-4, atol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), ref_b, rtol=1e-4, atol=1e-5)

    with pytest.raises(ConfigError, match="no adapter named"):
        set_adapter(model, "c")
    delete_adapter(model, "b")
    assert all("b" not in layer.lora_A for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)  # nothing active any more
    set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), ref_a, rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batch_equals_separate_runs(two_adapters):
    base, model = two_adapters
    rows = ["a", None, "b", "a"]
    with adapter_rows(model, rows):
        mixed = _logits(model)
    for i, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                alone = _logits(model, IDS[i: i + 1])
        else:
            set_adapter(model, name)
            alone = _logits(model, IDS[i: i + 1])
        torch.testing.assert_close(mixed[i: i + 1], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="one adapter name"), adapter_rows(model, ["a", "b"]):
        _logits(model)
    with pytest.raises(ConfigError, match="unknown adapters"), adapter_rows(model, ["a", "zzz", None, None]):
        pass


def test_mixed_batch_with_modules_to_save():
    base = make_tiny_llama()
    model = copy.deepcopy(base)
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=("q_proj",), modules_to_save=("lm_head",)), "a")
    add_lora(model, QV, "b")
    _randomize(model, "a", 3)
    _randomize(model, "b", 4)
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.add_(0.5)
    rows = [None, "a", "b", "a"]
    with adapter_rows(model, rows):
        mixed = _logits(model)
    for i, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                alone = _logits(model, IDS[i: i + 1])
        else:
            set_adapter(model, name)
            alone = _logits(model, IDS[i: i + 1])
        torch.testing.assert_close(mixed[i: i + 1], alone, rtol=1e-4, atol=1e-5)


# --- modules_to_save and tied embeddings ------------------------------------------------------------------
def test_modules_to_save_keeps_tied_embeddings_intact():
    model = make_tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed_before = model.model.embed_tokens.weight.detach().clone()
    base_logits = _logits(model)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj",), modules_to_save=("lm_head",)))
    wrapper = model.lm_head
    head_copy = wrapper.modules_to_save["default"].weight
    assert wrapper.original_module.weight is model.model.embed_tokens.weight  # the tie itself is untouched
    assert head_copy.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert head_copy.requires_grad and not model.model.embed_tokens.weight.requires_grad
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # training the head never moved the input side
    assert not torch.equal(head_copy, embed_before)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)

    trained = _logits(model)
    merged = merge_lora(model)
    assert merged.config.tie_word_embeddings is False  # a re-tie on save/load would discard the trained head
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, embed_before)
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-4, atol=1e-5)


# --- merging -----------------------------------------------------------------------------------------------
def test_merge_lora_float_returns_plain_model_with_same_logits():
    base = make_tiny_llama()
    model = copy.deepcopy(base)
    add_lora(model, QV)
    _randomize(model, "default", 5)
    with_adapter = _logits(model)
    torch.testing.assert_close(with_adapter, _logits(_manually_merged(base, model, "default")), rtol=1e-4, atol=1e-5)
    merge_adapters(model)  # reversible, in place
    torch.testing.assert_close(_logits(model), with_adapter, rtol=1e-4, atol=1e-5)
    with disable_adapters(model):  # unmerges for the block
        torch.testing.assert_close(_logits(model), _logits(base), rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(_logits(model), with_adapter, rtol=1e-4, atol=1e-5)

    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(merged), with_adapter, rtol=1e-4, atol=1e-5)


def test_merge_lora_refuses_quantized_base_with_the_fix():
    model = make_tiny_llama()
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    add_lora(model, QV)
    with pytest.raises(ConfigError, match="reload the base unquantized, merge, then quantize once"):
        merge_lora(model)
    assert any(isinstance(m, LoraLinear) for m in model.modules())  # refused before touching anything
    _randomize(model, "default", 6)
    with_adapter = _logits(model)
    with disable_adapters(model):
        without = _logits(model)
    merged = merge_lora(model, requantize=True)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    # NF4 rounds W + delta again, so not equal; but far closer to the adapted model than the base is
    err = (_logits(merged) - with_adapter).pow(2).mean()
    assert err < 0.25 * (without - with_adapter).pow(2).mean()


def test_quantized_model_step_zero_and_adapter_delta():
    model = make_tiny_llama()
    quantize(model, QuantConfig.for_method("rtn"), progress=False)
    qlogits = _logits(model)
    add_lora(model, QV)
    torch.testing.assert_close(_logits(model), qlogits, rtol=0, atol=0)
    _randomize(model, "default", 7)
    assert (_logits(model) - qlogits).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), qlogits, rtol=0, atol=0)


# --- the report ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_trainable_report_matches_peft_count(tie):
    peft = pytest.importorskip("peft")
    cfg = dict(r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), modules_to_save=("lm_head",))
    ours = make_tiny_llama(tie=tie)
    add_lora(ours, LoraConfig(**cfg))
    theirs = peft.get_peft_model(
        make_tiny_llama(tie=tie),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg["targets"]), modules_to_save=["lm_head"],
                        task_type="CAUSAL_LM"),
    )
    trainable, total = theirs.get_nb_trainable_parameters()
    assert count_parameters(ours) == (trainable, total)
    report = trainable_report(ours)
    assert report.splitlines()[0] == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_trainable_report_counts_quantized_weights_as_weights():
    float_model = make_tiny_llama()
    q_model = make_tiny_llama()
    quantize(q_model, QuantConfig.for_method("nf4"), progress=False)
    add_lora(float_model, QV)
    add_lora(q_model, QV)
    assert count_parameters(q_model) == count_parameters(float_model)


def test_short_form():
    assert _short_count(19_988_480) == "20M"
    assert _short_count(6_738_415_616) == "6.7B"
    assert _short_count(134_515_008) == "135M"
    assert _short_count(999) == "999"
    model = nn.Sequential(nn.Linear(100, 100))
    add_lora(model, LoraConfig(r=1, targets=("0",)))
    # 200 of 10,300 parameters
    assert trainable_report(model).splitlines()[1] == "trainable: ~200 (1.94%) | total: ~10K"


def test_adapters_added_to_an_eval_model_apply_no_dropout():
    """Regression: wrappers created inside an eval-mode model must not start in training mode (dropout on)."""
    from holdall.tuners.lora import LoraConfig, add_lora

    model = make_tiny_llama().eval()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 would hide dropout: give the adapter an effect
            nn.init.normal_(param)
    assert not any(m.training for m in model.modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
