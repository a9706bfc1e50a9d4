"""Dense bit packing: sizes, exact round trips, and the byte layout checked against hand-built references."""

from __future__ import annotations

import pytest
import torch

from holdall.core.packing import pack, packed_size, unpack
from holdall.errors import ConfigError


def _bitstream_reference(codes: list[int], bits: int) -> list[int]:
    """MSB-first bit stream built one bit at a time with Python ints: the layout, independently."""
    stream = "".join(format(c, f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 13, 64, 577])
def test_round_trip_and_size(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 2, n), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, -(-n * bits // 8)) == (3, 2, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_layout_matches_bitstream_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (21,), generator=gen, dtype=torch.uint8)
    assert pack(codes, bits).tolist() == _bitstream_reference(codes.tolist(), bits)


def test_dense_widths_really_take_their_bits():
    codes = torch.zeros(1024, dtype=torch.uint8)
    assert [pack(codes, b).numel() for b in range(2, 9)] == [256, 384, 512, 640, 768, 896, 1024]


def test_four_bit_is_bitsandbytes_layout():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    # even index in the high nibble; an odd count pads the last low nibble with 0
    assert pack(codes, 4).tolist() == [0x12, 0xF0, 0x70]


def test_errors():
    with pytest.raises(ConfigError, match="fit in 3 bits"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ConfigError, match="uint8"):
        pack(torch.tensor([1, 2]), 4)
    with pytest.raises(ConfigError, match="2..8"):
        pack(torch.tensor([1], dtype=torch.uint8), 1)
    with pytest.raises(ConfigError, match="take 4 bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, 8)
