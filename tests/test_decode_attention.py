"""The fused decode-attention step (kernels/decode_attention.py): its plain-torch reference against transformers'
rotary and an explicit float64 softmax, and (on CUDA with Triton) the Triton kernel against the reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from holdall.kernels.decode_attention import DecodeAttention, decode_attention_reference

cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                               reason="the Triton kernel needs a CUDA device")


def _tables(max_len: int, d: int, dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, max_position_embeddings=max_len)
    rotary = LlamaRotaryEmbedding(config).to(device)
    probe = torch.zeros(1, 1, d, dtype=dtype, device=device)
    cos, sin = rotary(probe, torch.arange(max_len, device=device)[None])
    return cos[0].contiguous(), sin[0].contiguous()


def _inputs(n_heads, n_kv, d, max_len, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return r(n_heads * d), r(n_kv * d), r(n_kv * d), r(n_kv, max_len, d), r(n_kv, max_len, d)


def _explicit(q, k, v, k_cache, v_cache, pos, cos, sin):
    """Float64 attention written out: transformers' apply_rotary_pos_emb, the new k/v at slot pos, softmax."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_kv, _, d = k_cache.shape
    n_heads = q.numel() // d
    qh, kh = apply_rotary_pos_emb(q.double().reshape(1, n_heads, 1, d), k.double().reshape(1, n_kv, 1, d),
                                  cos[pos][None, None].double(), sin[pos][None, None].double())
    keys = k_cache.double().clone()
    values = v_cache.double().clone()
    keys[:, pos] = kh[0, :, 0]
    values[:, pos] = v.double().reshape(n_kv, d)
    group = n_heads // n_kv
    out = torch.empty(n_heads, d, dtype=torch.float64)
    for h in range(n_heads):
        scores = keys[h // group, : pos + 1] @ qh[0, h, 0] / d ** 0.5
        out[h] = torch.softmax(scores, 0) @ values[h // group, : pos + 1]
    return out.reshape(-1), keys, values


@pytest.mark.parametrize("n_heads,n_kv,d", [(4, 4, 16), (8, 2, 32)])
@pytest.mark.parametrize("pos", [0, 9, 23])
def test_reference_is_rotary_plus_softmax_attention(n_heads, n_kv, d, pos):
    q, k, v, k_cache, v_cache = _inputs(n_heads, n_kv, d, 24, torch.float32, "cpu")
    cos, sin = _tables(24, d)
    want, keys, values = _explicit(q, k, v, k_cache, v_cache, pos, cos, sin)
    got = decode_attention_reference(q, k, v, k_cache, v_cache, torch.tensor([pos]), cos, sin)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache.double(), keys, rtol=1e-6, atol=1e-6)  # the new key written, rotated
    torch.testing.assert_close(v_cache.double(), values, rtol=0, atol=0)


def test_plan_refuses_shapes_it_cannot_compute():
    with pytest.raises(ValueError, match="evenly"):
        DecodeAttention(6, 4, 16, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="even head size"):
        DecodeAttention(4, 4, 15, 8, torch.device("cpu"), torch.float32)
    assert DecodeAttention(4, 2, 16, 8, torch.device("cpu"), torch.float32).use_triton is False


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_heads,n_kv,d,max_len", [(32, 32, 128, 272), (32, 8, 128, 300), (14, 2, 64, 100),
                                                    (4, 2, 16, 40)])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_triton_kernel_matches_reference(dtype, n_heads, n_kv, d, max_len, splits):
    device = "cuda"
    plan = DecodeAttention(n_heads, n_kv, d, max_len, torch.device(device), dtype, splits=splits)
    assert plan.use_triton
    cos, sin = _tables(max_len, d, dtype, device)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    for pos in sorted({p for p in (0, 1, 63, 64, 65, 129, 192, 193) if p < max_len} | {max_len // 2, max_len - 1}):
        q, k, v, k_cache, v_cache = _inputs(n_heads, n_kv, d, max_len, dtype, device, seed=pos)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        position = torch.tensor([pos], device=device)
        want = decode_attention_reference(q.float(), k.float(), v.float(), ref_k_f := ref_k.float(), ref_v.float(),
                                          position, cos.float(), sin.float())
        got = plan(q, k, v, k_cache, v_cache, position, cos, sin)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        # the cache: the new slot holds the rotated key (rounded once) and the value; every other slot untouched
        torch.testing.assert_close(k_cache[:, pos].float(), ref_k_f[:, pos], rtol=tol, atol=tol)
        assert torch.equal(v_cache[:, pos], v.reshape(n_kv, d))
        others = torch.arange(max_len, device=device) != pos
        assert torch.equal(k_cache[:, others], ref_k[:, others]) and torch.equal(v_cache[:, others], ref_v[:, others])
        assert int(plan._counters.abs().sum()) == 0  # back at zero for the next launch


@cuda_only
def test_triton_kernel_replays_in_a_cuda_graph_with_new_positions():
    dtype, device = torch.bfloat16, "cuda"
    plan = DecodeAttention(32, 8, 128, 500, torch.device(device), dtype)
    cos, sin = _tables(500, 128, dtype, device)
    q, k, v, k_cache, v_cache = _inputs(32, 8, 128, 500, dtype, device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan(q, k, v, k_cache.clone(), v_cache.clone(), position, cos, sin)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan(q, k, v, k_cache, v_cache, position, cos, sin)
    for pos in (3, 130, 499):
        position.fill_(pos)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        want = decode_attention_reference(q, k, v, ref_k, ref_v, position, cos, sin)
        graph.replay()
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
