"""FusedAdamW8bit (flat buckets) against AdamW8bit (per tensor) and torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from holdall.errors import ConfigError
from holdall.training.optim import AdamW8bit, FusedAdamW8bit, build_optimizer


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _run(opt_cls, params, steps=3, seed=1, **kw):
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def test_equals_per_tensor_adamw8bit_when_blocks_align():
    """Sizes that are multiples of 256 (LoRA's [r, in] and [out, r]): the flat 8-bit blocks are the per-tensor ones."""
    shapes = [(16, 512), (1024, 16), (16, 256), (8, 64)]  # the last one stays float32 (< 4096 elements)
    a, b = _params(shapes), _params(shapes)
    _run(AdamW8bit, a)
    _run(FusedAdamW8bit, b, bucket_size=9000)  # several buckets
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_32bit_equals_torch_adamw():
    shapes = [(7, 33), (300,), (5, 5, 5)]
    a, b = _params(shapes), _params(shapes)
    _run(torch.optim.AdamW, a, foreach=False)
    _run(FusedAdamW8bit, b, optim_bits=32)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_straddling_blocks_stay_close_to_float_adamw():
    shapes = [(4097,), (5000,), (3, 1111)]
    a, b = _params(shapes), _params(shapes)
    _run(torch.optim.AdamW, a, foreach=False)
    _run(FusedAdamW8bit, b)
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 2e-3  # three steps of lr 1e-2: 8-bit moments move the update a little


def test_parameter_without_grad_is_not_written_and_state_round_trips():
    params = _params([(16, 256), (16, 256)])
    opt = FusedAdamW8bit(params, lr=1e-2)
    params[0].grad = torch.ones_like(params[0])
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    # resume: a fresh optimizer loaded from the state dict continues exactly as the original
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = FusedAdamW8bit(clone, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for group in (params, clone):
        for p in group:
            p.grad = torch.full_like(p, 0.5)
    opt.step()
    opt2.step()
    for x, y in zip(params, clone):
        assert torch.equal(x, y)


def test_build_and_errors():
    opt = build_optimizer("fused_adamw8bit", _params([(4, 4)]), lr=1e-3)
    assert isinstance(opt, FusedAdamW8bit) and not opt.paged
    opt = build_optimizer("paged_fused_adamw8bit", _params([(4, 4)]), lr=1e-3)
    assert isinstance(opt, FusedAdamW8bit) and opt.paged
    with pytest.raises(ConfigError, match="bucket_size"):
        FusedAdamW8bit(_params([(4, 4)]), bucket_size=0)


def _step_both(opt_a, opt_b, a, b, steps: int, seed: int) -> None:
    """``steps`` optimizer steps of both optimizers on the same random gradients (made on the CPU, moved)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen).to(pa.device)
            pa.grad, pb.grad = g, g.clone()
        opt_a.step()
        opt_b.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled bucket update runs on CUDA (device machine)")
def test_cuda_compiled_update_matches_the_eager_one():
    shapes = [(16, 4096), (4096, 16), (16, 11008), (11008, 16)]
    a = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    b = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    opt_a = AdamW8bit(a, lr=1e-2, weight_decay=0.1)
    opt_b = FusedAdamW8bit(b, lr=1e-2, weight_decay=0.1, bucket_size=100000)
    _step_both(opt_a, opt_b, a, b, steps=4, seed=3)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paging moves states between CUDA and pinned CPU memory")
def test_cuda_paged_states_live_on_the_cpu_and_give_the_same_update():
    """paged=True: every state tensor in (pinned) CPU memory, parameters and states equal to the unpaged run's."""
    shapes = [(16, 4096), (4096, 16), (8, 64)]  # the last one keeps float32 states
    a = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    b = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    opt_a = FusedAdamW8bit(a, lr=1e-2, weight_decay=0.1, bucket_size=50000)
    opt_b = FusedAdamW8bit(b, lr=1e-2, weight_decay=0.1, bucket_size=50000, paged=True)
    _step_both(opt_a, opt_b, a, b, steps=3, seed=4)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    states_b = [s for s in opt_b.state.values() if s]
    assert states_b and all(v.device.type == "cpu" and v.is_pinned()
                            for s in states_b for k, v in s.items() if k != "step")
    for sa, sb in zip([s for s in opt_a.state.values() if s], states_b):
        for key in sa:
            if key != "step":
                torch.testing.assert_close(sb[key], sa[key].cpu(), rtol=0, atol=0)


def test_paged_on_a_cpu_only_run_equals_unpaged():
    shapes = [(16, 512), (8, 64)]
    a, b = _params(shapes), _params(shapes)
    _step_both(FusedAdamW8bit(a, lr=1e-2), FusedAdamW8bit(b, lr=1e-2, paged=True), a, b, steps=3, seed=5)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
