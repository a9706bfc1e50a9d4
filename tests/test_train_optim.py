"""AdamW8bit / paged AdamW: tracking torch's AdamW, checkpoint round trips, state size."""

from __future__ import annotations

import io
import math

import pytest
import torch

from holdall.core.codebooks import dynamic_map
from holdall.errors import ConfigError
from holdall.training.optim import (
    AdamW8bit,
    PagedAdamW,
    PagedAdamW8bit,
    build_optimizer,
    dequantize_signed,
    dequantize_unsigned,
    quantize_signed,
    quantize_unsigned,
    state_bytes,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _least_squares(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(256, 64, generator=g)  # [n, d]
    w_true = torch.randn(64, 80, generator=g)  # [d, k]: 5120 parameters, above the 8-bit threshold
    b = a @ w_true + 0.01 * torch.randn(256, 80, generator=g)
    w0 = torch.zeros(64, 80)
    return a, b, w0


def _run(make_opt, steps: int = 100):
    a, b, w0 = _least_squares()
    w = torch.nn.Parameter(w0.clone())
    bias = torch.nn.Parameter(torch.zeros(80))  # small: stays float32 in AdamW8bit
    opt = make_opt([w, bias])
    losses = []
    for _ in range(steps):
        loss = ((a @ w + bias - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, w.detach(), opt


def test_adamw8bit_tracks_torch_adamw():
    ref_losses, ref_w, _ = _run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01))
    losses, w, opt = _run(lambda p: AdamW8bit(p, lr=0.05, weight_decay=0.01))
    assert losses[-1] < 1e-3 * losses[0]  # it optimises (the loss falls ~2000x)
    # the curves stay together on a log scale over three decades (within 15%, mostly far closer)
    for ours, theirs in zip(losses, ref_losses):
        assert abs(math.log(ours / theirs)) < 0.15
    assert (w - ref_w).norm() / ref_w.norm() < 0.02
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_sq_codes"].dtype == torch.uint8


def test_first_steps_match_torch_adamw_closely():
    """Early on, 8-bit rounding of the moments barely moves the update: the first step is nearly exact."""
    ref_losses, _, _ = _run(lambda p: torch.optim.AdamW(p, lr=0.01), steps=5)
    losses, _, _ = _run(lambda p: AdamW8bit(p, lr=0.01), steps=5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=0)


def test_32bit_and_paged_variants_equal_torch_adamw_on_cpu():
    ref_losses, ref_w, _ = _run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01, foreach=False), steps=30)
    for make in (lambda p: AdamW8bit(p, lr=0.05, weight_decay=0.01, optim_bits=32),
                 lambda p: PagedAdamW(p, lr=0.05, weight_decay=0.01)):
        losses, w, _ = _run(make, steps=30)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    paged8, _, _ = _run(lambda p: PagedAdamW8bit(p, lr=0.05, weight_decay=0.01), steps=30)
    plain8, _, _ = _run(lambda p: AdamW8bit(p, lr=0.05, weight_decay=0.01), steps=30)
    assert paged8 == plain8  # on CPU paging is a no-op


def test_state_is_about_four_times_smaller():
    _, _, ref = _run(lambda p: torch.optim.AdamW(p, lr=0.05), steps=2)
    _, _, ours = _run(lambda p: AdamW8bit(p, lr=0.05, min_8bit_size=0), steps=2)
    ratio = state_bytes(ref) / state_bytes(ours)
    assert 3.5 < ratio <= 4.0, ratio


def test_small_tensors_keep_float32_states():
    _, _, opt = _run(lambda p: AdamW8bit(p, lr=0.05), steps=1)
    bias_state = opt.state[opt.param_groups[0]["params"][1]]
    assert bias_state["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in bias_state


def test_state_dict_round_trip_continues_identically():
    a, b, w0 = _least_squares()

    def make():
        w = torch.nn.Parameter(w0.clone())
        return w, AdamW8bit([w], lr=0.05)

    def steps(w, opt, n):
        out = []
        for _ in range(n):
            loss = ((a @ w - b) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    w, opt = make()
    straight = steps(w, opt, 10)
    w2, opt2 = make()
    first = steps(w2, opt2, 5)
    buffer = io.BytesIO()
    torch.save({"w": w2.detach().clone(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    w3, opt3 = make()
    with torch.no_grad():
        w3.copy_(saved["w"])
    opt3.load_state_dict(saved["opt"])
    state = opt3.state[w3]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32
    assert first + steps(w3, opt3, 5) == straight


def test_bf16_parameters_are_updated_in_float32():
    w = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = AdamW8bit([w], lr=1e-2, weight_decay=0.0)
    w.grad = torch.ones_like(w)
    opt.step()
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.float(), torch.full((8192,), 0.99), rtol=0, atol=4e-3)


def test_blockwise_codes_round_trip():
    x = torch.randn(1000) * torch.logspace(-4, 1, 1000)
    codes, absmax = quantize_signed(x)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    err = (dequantize_signed(codes, absmax) - x).abs()
    assert (err <= 0.02 * absmax.repeat_interleave(256)[:1000] + 1e-12).all()
    v = x**2
    codes, absmax = quantize_unsigned(v)
    back = dequantize_unsigned(codes, absmax)
    assert (back >= 0).all()
    assert ((back - v).abs() <= 0.02 * absmax.repeat_interleave(256)[:1000] + 1e-12).all()
    # an all-zero block decodes to exact zeros
    codes, absmax = quantize_unsigned(torch.zeros(300))
    assert torch.equal(dequantize_unsigned(codes, absmax), torch.zeros(300))
    assert dynamic_map(signed=False).min() == 0 and dynamic_map(signed=False).max() == 1


def test_build_optimizer_names():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(build_optimizer("adamw", p, 1e-3), torch.optim.AdamW)
    assert type(build_optimizer("adamw8bit", p, 1e-3)) is AdamW8bit
    assert isinstance(build_optimizer("paged_adamw8bit", p, 1e-3), PagedAdamW8bit)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build_optimizer("sgd", p, 1e-3)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer("adamw", [], 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_states_stay_in_cpu_memory_while_params_are_on_gpu():
    w = torch.nn.Parameter(torch.randn(10000, device="cuda"))
    opt = PagedAdamW8bit([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["exp_avg_codes"].device.type == "cpu" and state["exp_avg_codes"].is_pinned()
    assert w.device.type == "cuda" and torch.isfinite(w).all()
