"""algorithms.gram (tensor-core float32 products) and AWQ's loss pieces, against float64 torch math."""

import pytest
import torch

from holdall.algorithms import awq
from holdall.algorithms.gram import add_gram, half_mm_float32

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def test_add_gram_on_cpu_is_float32_xtx():
    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.bfloat16)
    total = torch.ones(24, 24)
    add_gram(total, x)
    want = 1 + x.double().T @ x.double()
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-4)
    assert half_mm_float32(x.T, x) is None  # only CUDA half inputs take the tensor-core path


def test_squared_distance_half_and_float():
    torch.manual_seed(1)
    ref = torch.randn(4, 7, 33)
    y = ref + 1e-2 * torch.randn_like(ref)
    want = (y.double() - ref.double()).pow(2).sum()
    torch.testing.assert_close(awq.squared_distance(y, ref), want, rtol=1e-12, atol=0)
    y16, ref16 = y.bfloat16(), ref.bfloat16()
    want16 = (y16.double() - ref16.double()).pow(2).sum()  # the bf16 values, exactly
    got16 = awq.squared_distance(y16, ref16)
    assert got16.dtype == torch.float64
    torch.testing.assert_close(got16, want16, rtol=1e-6, atol=0)


def test_linear_loss_matches_token_form_on_cpu():
    """tr(Δ H Δᵀ) from the Gram matrix equals ||Δ Xᵀ||² (more tokens than channels takes the Gram path)."""
    torch.manual_seed(2)
    x = torch.randn(200, 16)
    w = torch.randn(8, 16)
    loss = awq._LinearLoss(x, [w])
    assert loss.gram is not None and loss.gram.dtype == torch.float32
    c = w + 0.05 * torch.randn_like(w)
    want = float(((w - c).double() @ x.double().T).pow(2).sum())
    assert loss.loss([c]) == pytest.approx(want, rel=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_mm_float32_on_cuda(dtype):
    torch.manual_seed(3)
    a = torch.randn(257, 300, device="cuda", dtype=dtype)
    b = torch.randn(300, 129, device="cuda", dtype=dtype)
    got = half_mm_float32(a, b)
    assert got is not None and got.dtype == torch.float32
    want = a.double() @ b.double()  # exact products; only the float32 summation order differs
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    total = torch.zeros(300, 300, device="cuda")
    add_gram(total, a)
    torch.testing.assert_close(total.double(), a.double().T @ a.double(), rtol=1e-5, atol=1e-3)


@cuda
def test_linear_loss_bf16_on_cuda_close_to_float64():
    """The tensor-core loss (bf16 Δ and H, float32 accumulation) within 1e-3 of the float64 value."""
    torch.manual_seed(4)
    x = torch.randn(4096, 512, device="cuda").bfloat16()
    w = torch.randn(256, 512, device="cuda") * 0.02
    loss = awq._LinearLoss(x, [w])
    assert loss.gram.dtype == torch.bfloat16
    c = w + 1e-3 * torch.randn_like(w)
    d = (w - c).double()
    want = float(((d @ x.double().T) ** 2).sum())
    assert loss.loss([c]) == pytest.approx(want, rel=1e-3)
