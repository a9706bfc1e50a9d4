"""Blockwise codebook quantization (NF4/FP4) and double quantization of scales, bitsandbytes-compatible.

Bit-exact with ``bitsandbytes.functional.quantize_4bit`` on CPU (bitsandbytes 0.45+), including its
rounding details, which are part of what "compatible" means:

* the tensor is flattened and cut into blocks of ``blocksize``; one float32 absmax per block;
* full blocks are scaled by *multiplying* with ``1 / max(absmax, 1e-38)``; the partial last block is
  *divided* by ``max(absmax, 1e-38)``, and that clamped value is what gets stored for it (so an all-zero
  tail block stores 1e-38 while an all-zero full block stores 0);
* scaled values are clamped to [-1, 1] and mapped to the nearest code; a value exactly half-way between
  two codes takes the smaller one (``bucketize`` on float32 midpoints);
* FP4 has two zeros (codes 0 and 8): zero and small negatives map to code 0, small positives to code 8;
* an odd element count is padded with one 0.0 *value* before coding (so NF4 stores code 7 there).

Double quantization follows ``quantize_4bit(compress_statistics=True)``: ``offset = absmax.mean()``, then
``absmax - offset`` is quantized in blocks of 256 with the signed 8-bit dynamic map, by the rules of
bitsandbytes' CPU kernel (0.50): multiply by the float32 reciprocal of the block absmax, snap to a
65536-point grid over [-1, 1], and take that grid point's nearest code (so a value very close to a
midpoint can land on the farther code: that is bitsandbytes' behaviour and we reproduce it), with
code 0 for an all-zero block.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .codebooks import codebook, dynamic_map
from .packing import pack, unpack

#: bitsandbytes clamps block absmax to this before scaling, so an all-zero block divides by a tiny number.
ABSMAX_FLOOR = 1e-38
DOUBLE_QUANT_BLOCK = 256


# --- 4-bit codebooks ---------------------------------------------------------------------------------
def n_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks (the last may be partial) over ``numel`` elements."""
    return -(-numel // blocksize)


def quantize_4bit(x: torch.Tensor, kind: str, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4/FP4-quantize ``x`` (any shape, float16/bfloat16/float32).

    Returns ``(packed uint8 [ceil(numel/2), 1], absmax float32 [ceil(numel/blocksize)])``, the same tensors
    bitsandbytes' ``quantize_4bit`` returns (its ``quant_state.absmax`` without double quantization).
    """
    _check_blocksize(blocksize)
    flat = x.reshape(-1).float()  # [n]; exact for float16/bfloat16
    n = flat.numel()
    if n == 0:
        raise ConfigError("cannot quantize an empty tensor")
    scaled, absmax = _scale_blocks(flat, blocksize)  # [n] in [-1, 1], [n_blocks]
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad with a 0.0 value, as bitsandbytes does
    codes = nearest_code(scaled, codebook(kind, flat.device))  # [n + n % 2] uint8
    return pack(codes, 4).reshape(-1, 1), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    kind: str,
    blocksize: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``table[code] * absmax`` in float32, cast to ``dtype``, reshaped."""
    n = _numel(shape)
    codes = unpack(packed.reshape(-1), 4, n)  # [n]
    values = codebook(kind, packed.device)[codes.long()]  # [n] float32
    scale = absmax.float().repeat_interleave(blocksize)[:n]  # [n]
    return (values * scale).to(dtype).reshape(tuple(shape))


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` (float32 ``[K]``, any order) of the nearest entry to each value; ties -> smaller value.

    Equal table entries (FP4's two zeros) are ordered by index (stable sort), so the lower index takes
    values up to and including the shared midpoint (0.0) and the higher index the values above it.
    """
    values, order = torch.sort(table, stable=True)  # ascending, [K]
    midpoints = (values[:-1] + values[1:]) / 2  # [K-1] float32
    position = torch.bucketize(scaled, midpoints)  # first midpoint >= x: ties go to the smaller code
    return order[position].to(torch.uint8)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling with bitsandbytes' exact arithmetic (see the module docstring)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)  # [B, blocksize]
    absmax = blocks.abs().amax(dim=-1)  # [B], stored unclamped
    scaled = (blocks * (1.0 / absmax.clamp(min=ABSMAX_FLOOR))[:, None]).clamp(-1, 1).reshape(-1)
    if full == n:
        return scaled, absmax
    tail = flat[full:]
    tail_absmax = tail.abs().amax().clamp(min=ABSMAX_FLOOR)  # stored clamped
    scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    return scaled, torch.cat([absmax, tail_absmax.reshape(1)])


# --- 8-bit dynamic blockwise (used for double quantization) -------------------------------------------
def quantize_dynamic(x: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the signed dynamic map, as bitsandbytes' CPU ``quantize_blockwise``.

    ``x`` any shape -> ``(codes uint8 [numel], absmax float32 [ceil(numel/blocksize)])``.
    Each value is scaled by ``1 / absmax`` (a float32 reciprocal, then a multiply), clamped to [-1, 1],
    placed on a grid of 65536 points over [-1, 1] (``trunc((v + 1) * 0.5 * 65535 + 0.5)``, each step rounded
    to float32) and given the code nearest to that grid point (see :func:`_dynamic_grid_codes`).
    An all-zero block stores absmax 0 and codes 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = n_blocks(n, blocksize)
    padded = torch.cat([flat, flat.new_zeros(nb * blocksize - n)]).reshape(nb, blocksize)  # [nb, blocksize]
    absmax = padded.abs().amax(dim=-1)  # [nb]
    inverse = 1.0 / absmax  # inf for an all-zero block, whose codes are overwritten below
    normed = (padded * inverse[:, None]).clamp(-1.0, 1.0)
    grid = ((normed + 1.0) * 0.5) * float(_GRID - 1) + 0.5  # float32 at every step, no fused multiply-add
    index = grid.nan_to_num(0.0).to(torch.int64).clamp(0, _GRID - 1)  # truncation, as a C cast
    codes = _dynamic_grid_codes(flat.device)[index]  # [nb, blocksize]
    codes = torch.where((absmax == 0)[:, None], torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].contiguous(), absmax


#: bitsandbytes' CPU kernel resolves 8-bit codes through a table over this many evenly spaced points.
_GRID = 65536


def _dynamic_grid_codes(device: torch.device) -> torch.Tensor:
    """uint8 ``[65536]``: for grid point ``g_i = -1 + 2i / 65535`` (float32), the number of midpoints of the
    dynamic map strictly below ``g_i``, i.e. its nearest code with ties going to the smaller code."""
    key = str(device)
    table = _GRID_CACHE.get(key)
    if table is None:
        code = dynamic_map(signed=True, device=device)
        midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
        points = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32, device=device)) / float(_GRID - 1)
        table = torch.searchsorted(midpoints, points, side="left").clamp(max=255).to(torch.uint8)
        _GRID_CACHE[key] = table
    return table


_GRID_CACHE: dict[str, torch.Tensor] = {}


def _dynamic_table(device: torch.device) -> torch.Tensor:
    """The signed dynamic map on ``device``, made once per device and only read: decoding double-quantized
    scales inside a CUDA graph capture (the static decoder's reference path) cannot copy it from the CPU."""
    key = str(device)
    table = _DYNAMIC_CACHE.get(key)
    if table is None:
        table = _DYNAMIC_CACHE[key] = dynamic_map(signed=True, device=device)
    return table


_DYNAMIC_CACHE: dict[str, torch.Tensor] = {}


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_dynamic`: float32 ``[numel]`` = ``map[code] * absmax[block]``."""
    flat = codes.reshape(-1)
    table = _dynamic_table(flat.device)
    return table[flat.long()] * absmax.float().repeat_interleave(blocksize)[: flat.numel()]


def double_quantize(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA double quantization of a scale tensor (any shape).

    Returns ``(codes uint8 with the shape of scales, nested_absmax float32 [ceil(numel/256)],
    offset float32 [])`` where ``offset = mean(scales)``.
    """
    flat = scales.reshape(-1).float()
    # The mean is taken on the CPU whatever the device: a float32 sum's rounding depends on the reduction
    # order, and a device-independent offset makes CUDA produce the same bytes as CPU (and as bitsandbytes).
    offset = flat.cpu().mean().to(flat.device)
    codes, nested = quantize_dynamic(flat - offset, DOUBLE_QUANT_BLOCK)
    return codes.reshape(scales.shape), nested, offset


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: float32 scales with the shape of ``codes``."""
    values = dequantize_dynamic(codes, nested_absmax, DOUBLE_QUANT_BLOCK) + offset.float()
    return values.reshape(codes.shape)


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ConfigError(f"block size must be a positive integer, got {blocksize!r}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
