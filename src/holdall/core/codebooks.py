"""Lookup tables (codebooks) for the 4-bit formats and the 8-bit map used for double quantization.

All tables are float32, sorted or not exactly as bitsandbytes has them, because a stored code is an index
into the table: the order is part of the file format.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

#: NF4 (QLoRA): 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero. Code i is NF4_VALUES[i].
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: bitsandbytes' FP4 (1 sign bit, then 3 bits) before normalisation, for codes 0..7; code 8+i is -code i.
#: The magnitudes are in bitsandbytes' bit-pattern order (not sorted): 0, a subnormal 0.0625, then
#: 8, 12, 4, 6, 2, 3. Dividing by the largest magnitude (12) maps the table onto [-1, 1].
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@functools.lru_cache(maxsize=None)
def _nf4_cpu() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _fp4_cpu() -> torch.Tensor:
    # 0.0 - m (not -m) so that code 8 is +0.0, bit-identical to bitsandbytes' table.
    raw = torch.tensor(_FP4_MAGNITUDES + tuple(0.0 - m for m in _FP4_MAGNITUDES), dtype=torch.float32)  # [16]
    return raw / raw.abs().max()  # float32 division, as bitsandbytes normalises its table


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, float32 ``[16]``, index = stored code."""
    return _nf4_cpu().to(device) if device is not None else _nf4_cpu().clone()


def fp4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 16 FP4 values in [-1, 1], float32 ``[16]``, index = stored code (codes 0 and 8 are both 0)."""
    return _fp4_cpu().to(device) if device is not None else _fp4_cpu().clone()


def codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 4-bit table called ``name`` (``"nf4"`` or ``"fp4"``)."""
    if name == "nf4":
        return nf4_codebook(device)
    if name == "fp4":
        return fp4_codebook(device)
    raise ConfigError(f"unknown 4-bit codebook {name!r}; use 'nf4' or 'fp4'")


@functools.lru_cache(maxsize=None)
def _dynamic_cpu(signed: bool) -> torch.Tensor:
    # The dynamic type (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning"): after the sign,
    # a run of zero bits ends in an indicator bit; the number of zeros picks a decade 10^-6 .. 10^0 and the
    # remaining bits a linear fraction in [0.1, 1]. Decade e (0..6) therefore has 2^e (signed) or 2^(e+1)
    # (unsigned) values: the midpoints of a float32 linspace(0.1, 1) with that many intervals, times 10^(e-6).
    # Together with 0 and 1 that makes exactly 256 values.
    values = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for decade in range(7):
        count = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        # Scale in float32 by the power of ten: 1 is an exact int in the last decade, a Python float elsewhere.
        scaled = mids * (10 ** (decade - 6))
        values.append(scaled)
        if signed:
            values.append(-scaled)
    table = torch.cat(values)
    assert table.numel() == 256, table.numel()
    return torch.sort(table).values


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (``create_dynamic_map(signed)``): sorted float32 ``[256]``.

    Signed, it runs from -0.99297 to 1.0 with an exact 0 in between; double quantization uses it.
    """
    table = _dynamic_cpu(bool(signed))
    return table.to(device) if device is not None else table.clone()
