"""The static-cache greedy decoder (serving/static_decode.py) against transformers' own forward and generate.

CPU runs the same step eagerly; the CUDA-graph replay is checked by the same tests on a GPU (they are not skipped
there: cuda_graph defaults to on for CUDA models)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from holdall.errors import ConfigError, UnsupportedModelError
from holdall.serving.static_decode import StaticDecoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qwen2(rope_scaling=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


def _sharpen(model):
    # random tiny models have nearly flat logits: ties would make greedy comparisons meaningless
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def _hf_greedy(model, prompt, n):
    out = model.generate(prompt[None], max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("build", [
    lambda: make_tiny_llama(hidden=64, layers=2),  # grouped-query attention (4 heads, 2 kv heads)
    lambda: make_tiny_llama(hidden=64, layers=2, kv_heads=4, tie=True),
    lambda: make_tiny_llama(hidden=64, layers=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    _qwen2,  # q/k/v biases
])
def test_logits_and_greedy_tokens_match_transformers(build, one_thread):
    model = _sharpen(build()).to(DEVICE)
    prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    decoder = StaticDecoder(model, max_len=40)
    with torch.no_grad():
        reference = model(prompt[None]).logits[0].float()
    ours = decoder.forward(prompt[None], torch.arange(7, device=DEVICE))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    result = StaticDecoder(model, max_len=40).generate(prompt, 20)
    assert result.tokens == _hf_greedy(model, prompt, 20)


def test_step_by_step_equals_one_pass(one_thread):
    # decoding token by token through the cache gives the logits of one causal pass over the whole sequence
    model = make_tiny_llama(hidden=64, layers=2).to(DEVICE)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        reference = model(ids[None]).logits[0].float()
    decoder = StaticDecoder(model, max_len=16)
    logits = [decoder.prefill(ids[:5])]
    for pos in range(5, 12):
        logits.append(decoder.step(ids[pos], pos).clone())
    torch.testing.assert_close(torch.stack(logits), reference[4:], rtol=1e-4, atol=1e-4)


def test_quantized_model_decodes_like_its_own_forward(one_thread):
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=64, layers=2))
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    model = model.to(DEVICE)
    prompt = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert StaticDecoder(model, max_len=32).generate(prompt, 16).tokens == _hf_greedy(model, prompt, 16)


def test_bad_input_is_refused():
    model = make_tiny_llama(hidden=64, layers=1)
    with pytest.raises(ConfigError, match="max_len"):
        StaticDecoder(model, max_len=1)
    decoder = StaticDecoder(model, max_len=8)
    with pytest.raises(ConfigError, match="do not fit"):
        decoder.generate(torch.arange(6), 4)
    with pytest.raises(ConfigError, match="1..7"):
        decoder.prefill(torch.arange(8))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            StaticDecoder(model, max_len=8, cuda_graph=True)


def test_other_shapes_are_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="static decoding"):
        StaticDecoder(Qwen3ForCausalLM(config), max_len=8)


def test_fused_attention_step_equals_the_general_path(one_thread):
    # the decode step's fused attention (rotary table, cache write, attention over the written slots; the Triton
    # kernel on CUDA) gives the logits of the general path (rotary module, index_copy_, masked SDPA)
    model = make_tiny_llama(hidden=64, layers=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = model.to(DEVICE)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    fused = StaticDecoder(model, max_len=24, fused_attention=True)
    general = StaticDecoder(model, max_len=24, fused_attention=False)
    assert fused._attend is not None and general._attend is None
    got, want = [fused.prefill(ids[:3])], [general.prefill(ids[:3])]
    for pos in range(3, 20):
        got.append(fused.step(ids[pos], pos).clone())
        want.append(general.step(ids[pos], pos).clone())
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.k_cache[:, :, :, :20], general.k_cache[:, :, :, :20], rtol=1e-5, atol=1e-5)


def test_length_dependent_rotary_keeps_the_general_path():
    model = make_tiny_llama(hidden=64, layers=1, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert StaticDecoder(model, max_len=8)._attend is None
    with pytest.raises(ConfigError, match="rope type"):
        StaticDecoder(model, max_len=8, fused_attention=True)


@pytest.mark.parametrize("method,kw", [(None, {}), ("rtn", dict(bits=4, group_size=32)),
                                       ("nf4", dict(double_quant=True))])
def test_stacked_projections_decode_like_separate_ones(method, kw, one_thread, tmp_path):
    from holdall.algorithms import QuantConfig, quantize
    from holdall.models.checkpoint import load_quantized, save_quantized

    model = _sharpen(make_tiny_llama(hidden=64, layers=2))
    if method is not None:
        quantize(model, QuantConfig.for_method(method, **kw), progress=False)
    model = model.to(DEVICE)
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    separate = StaticDecoder(model, max_len=16, stack_projections=False)
    want = [separate.prefill(ids[:4])] + [separate.step(ids[p], p).clone() for p in range(4, 14)]
    stacked = StaticDecoder(model, max_len=16)
    double_quant = kw.get("double_quant", False)
    assert all((m is None) == double_quant for m in stacked._qkv + stacked._gate_up)
    got = [stacked.prefill(ids[:4])] + [stacked.step(ids[p], p).clone() for p in range(4, 14)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-4)
    if method is not None:  # the model's layers now view the stacked weights; saving still writes each layer
        save_quantized(model.cpu(), None, tmp_path / "q")
        again, _ = load_quantized(tmp_path / "q")
        assert set(again.state_dict()) == set(model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[name].cpu(), tensor.cpu()), name


def test_norm_fusion_is_refused_where_the_kernels_do_not_run():
    model = make_tiny_llama(hidden=64, layers=1)  # float32 linears: nothing to fold the norms into
    assert StaticDecoder(model, max_len=8)._fuse_norms is False
    with pytest.raises(ConfigError, match="fuse_norms=True"):
        StaticDecoder(model, max_len=8, fuse_norms=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the norms fold into the one-row TMA / Gluon GEMV (Hopper here)")
@pytest.mark.parametrize("method,kw", [("rtn", dict(bits=4, group_size=32)), ("nf4", dict(double_quant=True))])
def test_folded_norms_decode_like_separate_ones(method, kw):
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=128, layers=2, intermediate=256)).to(torch.bfloat16)
    quantize(model, QuantConfig.for_method(method, **kw), progress=False)
    model = model.to("cuda")
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(6)).to("cuda")
    separate = StaticDecoder(model, max_len=16, fuse_norms=False)
    want = [separate.prefill(ids[:4])] + [separate.step(ids[p], p).clone() for p in range(4, 14)]
    fused = StaticDecoder(model, max_len=16, fuse_norms=True)
    assert StaticDecoder(model, max_len=16)._fuse_norms  # the default where every projection can
    assert fused._fuse_norms and not separate._fuse_norms
    got = [fused.prefill(ids[:4])] + [fused.step(ids[p], p).clone() for p in range(4, 14)]
    got, want = torch.stack(got), torch.stack(want)
    # bf16: the fused step rounds the normalised row and the residual sums once fewer
    assert float((got - want).abs().max()) < 0.03 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def _round_decode_inputs(model):
    """Forward pre-hooks rounding every 4-bit layer's one-token input to int8 per word (W4A8's definition)."""
    from holdall.core.linear import QuantLinear
    from holdall.kernels.packed import round_activations_s8

    def hook(module, args):
        x = args[0]
        return (round_activations_s8(x),) if x.numel() == x.shape[-1] else None

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, QuantLinear)]


def _decode_logits(decoder, ids, prompt=4):
    return torch.stack([decoder.prefill(ids[:prompt])] + [decoder.step(ids[p], p).clone()
                                                           for p in range(prompt, ids.numel())])


@pytest.mark.parametrize("fused_attention", [True, False])
def test_int8_activations_decode_like_rounded_inputs(fused_attention, one_thread):
    """``int8_activations``: each decode step's 4-bit projections see their input rounded per 8-input word to
    int8 (the prompt's prefill does not): the same logits as a decoder whose layers round their one-token inputs
    by hooks, and not the float-activation ones."""
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=64, layers=2))
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    model = model.to(DEVICE)
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    floats = _decode_logits(StaticDecoder(model, max_len=16, fused_attention=fused_attention), ids)
    got = _decode_logits(StaticDecoder(model, max_len=16, fused_attention=fused_attention, int8_activations=True),
                         ids)
    hooks = _round_decode_inputs(model)
    try:
        want = _decode_logits(StaticDecoder(model, max_len=16, fused_attention=fused_attention,
                                            stack_projections=False, fuse_norms=False), ids)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], floats[0])  # the prefill keeps float activations
    assert float((got[1:] - floats[1:]).abs().max()) > 1e-3 * float(floats.abs().max())


def test_int8_activations_need_integer_codes():
    from holdall.algorithms import QuantConfig, quantize

    model = make_tiny_llama(hidden=64, layers=1)
    assert StaticDecoder(model, max_len=8, int8_activations=True)._int8  # float linears are left alone
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    with pytest.raises(ConfigError, match="int8_activations=True.*nf4"):
        StaticDecoder(model, max_len=8, int8_activations=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the int8 rounding happens inside the one-row TMA GEMV (Hopper)")
@pytest.mark.parametrize("fuse_norms", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_activation_kernels_decode_like_rounded_inputs(fuse_norms, symmetric):
    """On Hopper the rounding and the integer dot products run inside the GEMV (``XQ8``): bf16 logits close to
    the hook-rounded reference decoder's (which runs the float kernels on rounded inputs)."""
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=128, layers=2, intermediate=256)).to(torch.bfloat16)
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32, symmetric=symmetric), progress=False)
    model = model.to("cuda")
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(9)).to("cuda")
    got = _decode_logits(StaticDecoder(model, max_len=16, int8_activations=True, fuse_norms=fuse_norms), ids)
    hooks = _round_decode_inputs(model)
    try:
        want = _decode_logits(StaticDecoder(model, max_len=16, stack_projections=False, fuse_norms=False), ids)
    finally:
        for h in hooks:
            h.remove()
    assert float((got - want).abs().max()) < 0.03 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="int8 words handed between the one-row TMA GEMVs (Hopper)")
def test_int8_handoff_decodes_like_rounding_in_each_gemv():
    """With int8 activations and folded norms, o_proj / down_proj write the next row as int8 words
    (``_int8_handoff``, the default): the same numbers as each consumer rounding it itself, so the same logits,
    bit for bit."""
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=128, layers=2, intermediate=256)).to(torch.bfloat16)
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32), progress=False)
    model = model.to("cuda")
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(11)).to("cuda")
    own = StaticDecoder(model, max_len=16, int8_activations=True)
    own._int8_handoff = False
    want = _decode_logits(own, ids)
    decoder = StaticDecoder(model, max_len=16, int8_activations=True)
    assert decoder._fuse_norms and decoder._int8_handoff
    assert torch.equal(_decode_logits(decoder, ids), want)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the gated activation folds into the one-row TMA / Gluon GEMV (Hopper here)")
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gated_activation_in_the_gate_up_epilogue_decodes_like_the_separate_kernel(int8, symmetric):
    """With folded norms the stacked gate/up GEMV writes ``silu(gate) * up`` itself (``_glu``, the default): the
    same logits as the separate SiLU x up launch, up to the SiLU's last float32 bit (rarely one bf16 step)."""
    from holdall.algorithms import QuantConfig, quantize

    model = _sharpen(make_tiny_llama(hidden=128, layers=2, intermediate=256)).to(torch.bfloat16)
    quantize(model, QuantConfig.for_method("rtn", bits=4, group_size=32, symmetric=symmetric), progress=False)
    model = model.to("cuda")
    ids = torch.randint(0, 128, (14,), generator=torch.Generator().manual_seed(12)).to("cuda")
    decoder = StaticDecoder(model, max_len=16, int8_activations=int8)
    assert decoder._fuse_norms and decoder._glu and all(g is not None for g in decoder._gate_up)
    got = _decode_logits(decoder, ids)
    separate = StaticDecoder(model, max_len=16, int8_activations=int8)
    separate._glu = False
    want = _decode_logits(separate, ids)
    assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
