"""NF4/FP4 and double quantization: bit-exact against bitsandbytes' CPU implementation."""

from __future__ import annotations

import pytest
import torch

from holdall.core import codebook
from holdall.core.codebooks import NF4_VALUES, dynamic_map, fp4_codebook, nf4_codebook
from holdall.core.qtensor import QuantizedTensor
from holdall.core.scheme import QuantScheme

bnbf = pytest.importorskip("bitsandbytes.functional")

# From /work/shared/reference/quantization.md section 5 (bitsandbytes get_4bit_type("nf4")).
NF4_DOC = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns, so -0.0 != 0.0 and equality is really bitwise."""
    return t.contiguous().view(torch.int32)


def test_nf4_table():
    assert list(NF4_VALUES) == NF4_DOC
    assert torch.equal(bits_of(nf4_codebook()), bits_of(bnbf.get_4bit_type("nf4", device="cpu")))


def test_fp4_table():
    assert torch.equal(bits_of(fp4_codebook()), bits_of(bnbf.get_4bit_type("fp4", device="cpu")))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed=signed)
    assert ours.shape == (256,)
    assert torch.equal(bits_of(ours), bits_of(bnbf.create_dynamic_map(signed=signed)))


def make_weight(shape, dtype, seed):
    """Gaussian weights with an outlier, an all-zero full block and (when there is one) an all-zero tail."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    flat = w.view(-1)
    flat[min(3, flat.numel() - 1)] = 0.7  # outlier
    if flat.numel() >= 192:
        flat[64:128] = 0.0  # an all-zero full block
    tail = flat.numel() % 64
    if tail and flat.numel() > 64:
        flat[-tail:] = 0.0  # an all-zero partial block
    return w.to(dtype)


SHAPES = [(64,), (7,), (65,), (128, 96), (33, 17), (300, 257)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_bit_exact_with_bitsandbytes(shape, dtype, kind, double_quant):
    w = make_weight(shape, dtype, seed=len(shape) * 100 + shape[0])
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=kind)
    q = QuantizedTensor.from_float(w, QuantScheme(dtype=kind, group_size=64, double_quant=double_quant))
    t = q.tensors()
    assert torch.equal(t["qdata"], ref_packed)
    if double_quant:
        assert torch.equal(t["scale"], state.absmax)  # uint8 codes of absmax - offset
        assert torch.equal(bits_of(t["scale_offset"].reshape(1)), bits_of(state.offset.reshape(1)))
        assert torch.equal(bits_of(t["scale_absmax"]), bits_of(state.state2.absmax))
    else:
        assert torch.equal(bits_of(t["scale"]), bits_of(state.absmax))
    # dequantization, against the same formula written out here: table[code] * absmax, per block
    table = nf4_codebook() if kind == "nf4" else fp4_codebook()
    n = w.numel()
    packed = t["qdata"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    absmax = q.scales()
    if double_quant:
        nested = state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()]
        expected_absmax = state.state2.code[state.absmax.long()] * nested + state.offset
        assert torch.equal(absmax, expected_absmax)
    expected = (table[codes] * absmax.repeat_interleave(64)[:n]).to(dtype).reshape(shape)
    assert torch.equal(q.dequantize(dtype), expected)


@pytest.mark.parametrize("n", [64, 65, 7, 200])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dequantize_equals_bitsandbytes_on_flat_tensors(n, kind):
    # bitsandbytes' own CPU dequantization (checked on 1-D tensors, where its row layout is trivially right)
    w = make_weight((n,), torch.float32, seed=n)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=kind)
    ours = QuantizedTensor.from_float(w, QuantScheme(dtype=kind, group_size=64, double_quant=True)).dequantize()
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state).reshape(-1))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_block_sizes(blocksize):
    w = make_weight((40, 72), torch.float32, seed=blocksize)
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    t = QuantizedTensor.from_float(w, QuantScheme(dtype="nf4", group_size=blocksize, double_quant=True)).tensors()
    assert torch.equal(t["qdata"], ref_packed)
    assert torch.equal(t["scale"], state.absmax)
    assert torch.equal(t["scale_absmax"], state.state2.absmax)


@pytest.mark.parametrize("n", [256 * 40, 256 * 3 + 37, 5])
def test_dynamic_blockwise_equals_bitsandbytes(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)
    if n > 600:
        x[256:512] = 0.0  # all-zero block: codes 0, absmax 0
    ref_codes, ref_state = bnbf.quantize_blockwise(x, blocksize=256)
    codes, absmax = codebook.quantize_dynamic(x, 256)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codebook.dequantize_dynamic(codes, absmax, 256), bnbf.dequantize_blockwise(ref_codes, ref_state))


def test_single_block_double_quant():
    # one block: absmax - mean(absmax) is exactly 0, an all-zero nested block
    w = torch.randn(64, generator=torch.Generator().manual_seed(0))
    _, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = QuantizedTensor.from_float(w, QuantScheme(dtype="nf4", group_size=64, double_quant=True)).tensors()
    assert torch.equal(t["scale"], state.absmax) and torch.equal(t["scale_absmax"], state.state2.absmax)


def test_nearest_code_ties_go_to_the_smaller_value():
    table = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.5, 0.25, 0.75, 0.2, 0.3])
    assert codebook.nearest_code(x, table).tolist() == [0, 1, 2, 1, 2]


def test_codebook_sqnr_and_any_shape():
    w = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(4)) * 0.02
    for kind, threshold in (("nf4", 19.0), ("fp4", 16.0)):
        q = QuantizedTensor.from_float(w, QuantScheme(dtype=kind, group_size=64))
        deq = q.dequantize()
        assert deq.shape == w.shape
        assert float(20 * torch.log10(w.norm() / (w - deq).norm())) > threshold
