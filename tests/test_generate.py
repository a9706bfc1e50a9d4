"""``holdall.generate`` / ``holdall generate``: greedy continuation on the static-cache decoder, transformers'
``generate`` as the witness and as the fallback for other architectures."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.errors import ConfigError, UnsupportedModelError
from holdall.serving.generate import generate

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _sharp(model):
    """Peaked logits, so greedy paths do not flip on a last-bit difference between two implementations."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def _hf_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    return out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def test_static_engine_continues_like_transformers_generate(tok, one_thread):
    model = _sharp(make_tiny_llama(vocab=64))
    result = generate(model, tok, PROMPT, 12)
    ids = tok(PROMPT)["input_ids"]
    assert result.engine == "static" and result.fallback_reason is None
    assert result.prompt_tokens == len(ids)
    assert result.tokens == _hf_greedy(model, tok, ids, 12)
    assert result.text == tok.decode(result.tokens, skip_special_tokens=True)
    assert result.finish_reason == ("length" if len(result.tokens) == 12 else "stop")
    hf = generate(model, tok, PROMPT, 12, engine="hf")
    assert hf.engine == "hf" and hf.tokens == result.tokens and hf.text == result.text
    record = result.to_dict()
    assert record["tokens"] == result.tokens and record["tokens_per_s"] > 0


def test_a_quantized_model_decodes_like_its_own_generate(tok, one_thread):
    from holdall.algorithms import QuantConfig, quantize

    model = _sharp(make_tiny_llama(vocab=64))
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    result = generate(model, tok, PROMPT, 10)
    assert result.engine == "static"
    assert result.tokens == _hf_greedy(model, tok, tok(PROMPT)["input_ids"], 10)
    w4a8 = generate(model, tok, PROMPT, 10, int8_activations=True)  # rounded in torch on the CPU
    assert w4a8.engine == "static" and len(w4a8.tokens) >= 1


def test_end_of_sequence_stops_and_is_not_returned(tok, one_thread):
    model = _sharp(make_tiny_llama(vocab=64))
    first = generate(model, tok, PROMPT, 4).tokens
    model.generation_config.eos_token_id = [tok.eos_token_id, first[1]]  # the second token ends it
    for engine in ("static", "hf"):
        result = generate(model, tok, PROMPT, 4, engine=engine)
        assert result.tokens == first[:1] and result.finish_reason == "stop", engine


def test_other_architectures_fall_back_to_transformers(tok, one_thread):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)  # Gemma: a family holdall reads, whose GELU-gated MLP the static decoder does not fuse
    model = GemmaForCausalLM(GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         vocab_size=64)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    result = generate(model, tok, PROMPT, 5)
    assert result.engine == "hf" and "static decoding" in result.fallback_reason
    ids = tok(PROMPT)["input_ids"]
    assert result.tokens == _hf_greedy(model, tok, ids, 5)
    with pytest.raises(UnsupportedModelError, match="static decoding"):
        generate(model, tok, PROMPT, 5, engine="static")
    with pytest.raises(UnsupportedModelError, match="static decoding"):
        generate(model, tok, PROMPT, 5, int8_activations=True)  # asked for the static path's option


def test_chat_wraps_the_prompt_in_the_template(one_thread):
    tok = make_tiny_tokenizer()
    model = _sharp(make_tiny_llama(vocab=64))
    with pytest.raises(ConfigError, match="no chat template"):
        generate(model, tok, PROMPT, 3, chat=True)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    result = generate(model, tok, PROMPT, 3, chat=True)
    assert result.prompt_tokens == 1 + len(tok(PROMPT, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt="  "), "prompt is empty"),
    (dict(max_new_tokens=0), "positive integer"),
    (dict(engine="vllm"), "engine must be one of"),
    (dict(engine="hf", int8_activations=True), "static-cache decoder only"),
])
def test_bad_requests_are_refused(tok, kwargs, match):
    model = make_tiny_llama(vocab=64)
    args = {"prompt": PROMPT, "max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate(model, tok, args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_cli_prints_the_continuation(tok, tmp_path, capsys, one_thread):
    from holdall.cli.main import main

    model = _sharp(make_tiny_llama(vocab=64))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    want = generate(model, tok, PROMPT, 6)
    assert main(["generate", str(tmp_path / "m"), "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "cpu",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"] == want.tokens and record["engine"] == "static"
    (tmp_path / "p.txt").write_text(PROMPT, encoding="utf-8")
    assert main(["generate", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == want.text and "tokens/s" in out.err
    assert main(["generate", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_is_a_public_verb():
    import holdall

    assert holdall.generate is generate and "generate" in dir(holdall)


def test_cpu_int4_kernel_for_one_call(tok, one_thread, monkeypatch):
    """``cpu_int4=True``: a bf16 int4 model's layers through torch's CPU int4 matmul for this call only (then
    the reference again); the same greedy tokens here (peaked logits), and a clear error for an fp32 model."""
    from holdall.algorithms import QuantConfig, quantize
    from holdall.core import backends
    from holdall.kernels import cpu_int4

    if not cpu_int4.available():
        pytest.skip("this torch build has no CPU int4 kernels")
    model = _sharp(make_tiny_llama(vocab=64))
    with pytest.raises(ConfigError, match="nothing to run.*no quantized layers"):
        generate(model.to(torch.bfloat16), tok, PROMPT, 4, cpu_int4=True)  # a float model: nothing to claim
    model = model.float()
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    with pytest.raises(ConfigError, match="bf16 models"):
        generate(model, tok, PROMPT, 4, cpu_int4=True)
    model = model.to(torch.bfloat16)
    calls = []
    real = cpu_int4.forward
    monkeypatch.setattr(cpu_int4, "forward", lambda layer, x: calls.append(1) or real(layer, x))
    fast = generate(model, tok, PROMPT, 8, cpu_int4=True)
    assert len(calls) >= 8  # every decode step's 4-bit layers went through the kernel
    assert cpu_int4.BACKEND not in backends.available_backends()
    assert fast.engine == "static" and fast.tokens == generate(model, tok, PROMPT, 8).tokens


def test_cpu_int4_refuses_a_torch_without_the_kernels(tok, monkeypatch):
    """A torch build without the CPU int4 kernels: ``cpu_int4=True`` says so instead of silently running the
    reference path it was asked to replace."""
    from holdall.kernels import cpu_int4

    monkeypatch.setattr(cpu_int4, "available", lambda: False)
    model = make_tiny_llama(vocab=64).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="lacks.*upgrade torch, or drop cpu_int4"):
        generate(model, tok, PROMPT, 4, cpu_int4=True)


def test_cli_cpu_int4_runs_a_saved_quantized_directory(tok, tmp_path, capsys, one_thread):
    """``holdall generate DIR --cpu-int4`` on a holdall-quantized directory saved in fp32: converted to bf16 (said
    on stderr) and decoded through the kernel, the same tokens as the Python verb on the bf16 model."""
    from holdall.algorithms import QuantConfig, quantize
    from holdall.cli.main import main
    from holdall.kernels import cpu_int4
    from holdall.models.checkpoint import save_quantized

    if not cpu_int4.available():
        pytest.skip("this torch build has no CPU int4 kernels")
    model = _sharp(make_tiny_llama(vocab=64))
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    out = save_quantized(model, tok, tmp_path / "q")
    want = generate(model.to(torch.bfloat16), tok, PROMPT, 6, cpu_int4=True)
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "cpu",
                 "--cpu-int4", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == want.tokens and "converted the model to bfloat16" in captured.err

