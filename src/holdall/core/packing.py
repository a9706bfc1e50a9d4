"""Dense bit-packing of 2..8-bit codes into bytes.

Layout: the codes of a row form one MSB-first bit stream. Code j occupies stream bits
``[j*bits, (j+1)*bits)`` with its most significant bit first; byte k holds stream bits ``[8k, 8k+8)``,
again most significant first. So 8 codes always fill exactly ``bits`` bytes, a row of n codes takes
``ceil(n*bits/8)`` bytes, and the unused tail bits of the last byte are zero.

For 4 bits this is bitsandbytes' layout (two codes per byte, the even index in the high nibble);
for 2 bits four codes per byte, the first in the top two bits; 8 bits is the identity.
Packing runs along the last dimension only; leading dimensions are kept.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PACK_BITS = (2, 3, 4, 5, 6, 7, 8)


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8 ``[..., n]``, each ``< 2**bits``) into uint8 ``[..., ceil(n*bits/8)]``."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ConfigError(f"pack() needs uint8 codes, got {codes.dtype}; convert with codes.to(torch.uint8)")
    if codes.dim() == 0:
        raise ConfigError("pack() needs at least one dimension; reshape a scalar to [1]")
    if bits == 8:
        return codes.clone()
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ConfigError(f"a code {int(codes.max())} does not fit in {bits} bits; codes must be < {2**bits}")
    if bits == 4:  # the common case, without the int64 detour: high nibble = even index
        pairs = _pad_last(codes, n + n % 2).reshape(*lead, (n + 1) // 2, 2)
        return (pairs[..., 0] << 4) | pairs[..., 1]
    n_chunks = (n + 7) // 8
    padded = _pad_last(codes, n_chunks * 8).to(torch.int64).reshape(*lead, n_chunks, 8)  # [..., C, 8]
    # One int64 word per chunk of 8 codes: code j sits at bit offset bits*(7-j) (MSB-first stream).
    shifts = torch.arange(7, -1, -1, device=codes.device, dtype=torch.int64) * bits  # [8]
    words = (padded << shifts).sum(dim=-1, keepdim=True)  # [..., C, 1]; codes never overlap, so sum == OR
    # Split each word (8*bits significant bits) into `bits` bytes, most significant byte first.
    byte_shifts = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.int64) * 8  # [bits]
    out = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, n_chunks * bits)  # [..., C*bits]
    return out[..., : packed_size(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(n*bits/8)]`` -> uint8 codes ``[..., n]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ConfigError(f"unpack() needs uint8 data, got {packed.dtype}")
    if packed.dim() == 0:
        raise ConfigError("unpack() needs at least one dimension")
    expected = packed_size(n, bits)
    if packed.shape[-1] != expected:
        raise ConfigError(
            f"{n} codes of {bits} bits take {expected} bytes, but the packed row has {packed.shape[-1]}; "
            "pass the n and bits the data was packed with"
        )
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    if bits == 4:
        pairs = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(*lead, 2 * packed.shape[-1])
        return pairs[..., :n].contiguous()
    n_chunks = (n + 7) // 8
    data = _pad_last(packed, n_chunks * bits).to(torch.int64).reshape(*lead, n_chunks, bits)  # [..., C, bits]
    byte_shifts = torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int64) * 8
    words = (data << byte_shifts).sum(dim=-1, keepdim=True)  # [..., C, 1]
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.int64) * bits  # [8]
    codes = ((words >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*lead, n_chunks * 8)
    return codes[..., :n].contiguous()


def _pad_last(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``t`` up to ``length``."""
    extra = length - t.shape[-1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-1], extra)], dim=-1)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ConfigError(f"can only pack codes of 2..8 bits, got bits={bits!r}")
