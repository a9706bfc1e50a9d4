"""What the 4-bit kernels read, taken straight from a ``QuantLinear``'s own buffers, and the plain-torch
reference both kernels are checked against.

No repacked copy. holdall's 4-bit layouts are already what a GPU wants to stream: an int4 weight is
``qdata uint8 [out, in/2]`` (row-major, two codes per byte, the even input index in the high nibble), and an
NF4/FP4 weight is the same bytes over the flattened ``[out, in]`` tensor, so row ``n`` of either is one
contiguous run of ``in/2`` bytes. Reading it as int32 words (8 codes each) gives 16-byte-per-thread loads,
coalesced along the input dimension, with no second copy of the weight (extra memory: 0 bytes per layer; the
only device-side extras are small tables shared by every layer: 2 KiB of NF4/FP4 byte-pair values, 64 bytes of
16-bit codebook values and 1 KiB of the double-quantization map).

Everything here needs only torch, so the dispatch predicate and the reference run on machines without
Triton (CI's CPU runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.codebooks import codebook, dynamic_map
from ..core.scheme import DOUBLE_QUANT_BLOCK

#: Codes per int32 word: the kernels' unit of loading and of grouping.
CODES_PER_WORD = 8
#: Group/block sizes (codes) the kernels take: one group is one GEMM iteration, whose two dots need K >= 16
#: (so at least 32 codes), and one GEMV tile of at most 32 words.
MIN_GROUP, MAX_GROUP = 32, 256


@dataclass(frozen=True)
class Plan:
    """The layer-shape facts a launch needs (no tensors: cheap to cache on the layer).

    kind: 0 symmetric int (implicit zero 8), 1 asymmetric int (stored 4-bit zeros), 2 codebook (nf4/fp4).
    group: codes sharing one scale along a row (power of two, 32..256). Channel/tensor int granularities use a
        virtual group of 128 with ``group_step = 0``, so every virtual group reads scale column 0.
    scale_row_stride / group_step: the scale of (row n, group g) is element ``n * scale_row_stride + g * group_step``
        of the flattened scale tensor (int: ``[R, G]``; codebook: ``[n_blocks]`` with ``n_blocks = out * in / block``).
    zero_row_stride: bytes per row of the packed asymmetric zeros ``[R, ceil(G/2)]``.
    """

    out_features: int
    in_features: int
    kind: int
    group: int
    group_step: int
    scale_row_stride: int
    zero_row_stride: int
    double_quant: bool
    codebook: str | None


def why_unsupported(layer: torch.nn.Module) -> str | None:
    """None when the kernels can run this layer's format; otherwise the reason (for logs and tests)."""
    scheme = layer.scheme
    in_features = layer.in_features
    if scheme.bits != 4:
        return f"{scheme.label}: the kernels read 4-bit codes only"
    if in_features % CODES_PER_WORD:
        return f"in_features={in_features} is not a multiple of {CODES_PER_WORD} (whole int32 words per row)"
    if scheme.is_codebook or scheme.granularity == "group":
        group = scheme.group_size
        if group & (group - 1) or not MIN_GROUP <= group <= MAX_GROUP:
            return f"group/block size {group} is not a power of two in [{MIN_GROUP}, {MAX_GROUP}]"
        if scheme.is_codebook and in_features % group:
            # A codebook block is a run of the *flattened* tensor; it lines up with rows only when it divides them.
            return f"{scheme.label}: blocks of {group} straddle rows of {in_features}"
    for name in layer._weight_names:
        if not layer._buffers[name].is_contiguous():
            return f"buffer {name!r} is not contiguous"
    if layer.qdata.storage_offset() % 4:
        return "qdata does not start on a 4-byte boundary (it cannot be read as int32 words)"
    return None


def plan(layer: torch.nn.Module) -> Plan:
    """The launch facts for a supported layer (see :func:`why_unsupported`)."""
    scheme = layer.scheme
    out_features, in_features = layer.out_features, layer.in_features
    if scheme.is_codebook:
        blocks_per_row = in_features // scheme.group_size
        return Plan(out_features, in_features, 2, scheme.group_size, 1, blocks_per_row, 0,
                    scheme.double_quant, scheme.dtype)
    rows, cols = layer.scale.shape  # [R, G]: R is 1 for tensor granularity, G is 1 for channel/tensor
    grouped = scheme.granularity == "group"
    return Plan(
        out_features,
        in_features,
        0 if scheme.symmetric else 1,
        scheme.group_size if grouped else 128,
        1 if grouped else 0,
        cols if rows > 1 else 0,
        (layer.zero.shape[1] if rows > 1 else 0) if not scheme.symmetric else 0,
        scheme.double_quant,
        None,
    )


@dataclass(frozen=True)
class Operands:
    """Tensor views of one layer's buffers in the form the kernels take (views: no copies)."""

    codes: torch.Tensor  # uint8 [out, in/2]: the packed codes, 2 per byte (even input index in the high nibble)
    words: torch.Tensor  # int32 [out, in/8]: the same bytes, 8 codes per word (little-endian)
    scale: torch.Tensor  # flattened: fp16/bf16/fp32 scales or uint8 double-quant codes
    zero: torch.Tensor  # uint8 [R, ceil(G/2)] packed zeros (asym int), else the scale tensor as a dummy
    scale_absmax: torch.Tensor  # float32 [n_scales/256] nested absmax (double quant), else a dummy
    scale_offset: torch.Tensor  # float32 [] mean offset (double quant), else a dummy
    dmap: torch.Tensor  # float32 [256] signed dynamic map (double quant), else a dummy
    pairs: torch.Tensor  # int64 [256]: float32 (high-nibble value, low-nibble value) of each byte (codebook)
    values: torch.Tensor  # float32 [16]: the codebook (codebook), else a dummy
    values16: torch.Tensor  # int16 [32]: the codebook's bf16 bits, then its fp16 bits (codebook), else a dummy


def operands(layer: torch.nn.Module, p: Plan) -> Operands:
    """Views of ``layer``'s buffers for a launch; the tables are cached per device and shared by all layers."""
    qdata = layer.qdata.reshape(p.out_features, p.in_features // 2)  # codebook: [numel/2, 1] -> [out, in/2]
    words = qdata.view(torch.int32)  # [out, in/8]; little-endian: byte b of a word is bits 8b..8b+7
    scale = layer.scale.reshape(-1)
    device = qdata.device
    dummy = scale
    if p.double_quant:
        absmax, offset, dmap = layer.scale_absmax, layer.scale_offset, _table("dmap", device)
    else:
        absmax = offset = dmap = dummy
    zero = layer.zero if p.kind == 1 else dummy
    if p.kind == 2:
        pairs, values = _table("pairs:" + p.codebook, device), _table("values:" + p.codebook, device)
        values16 = _table("values16:" + p.codebook, device)
    else:
        pairs = values = values16 = dummy
    return Operands(qdata, words, scale, zero, absmax, offset, dmap, pairs, values, values16)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    table = _TABLES.get(key)
    if table is None:
        if name == "dmap":
            table = dynamic_map(signed=True)
        elif name.startswith("values:"):
            table = codebook(name.split(":")[1], "cpu")
        elif name.startswith("values16:"):  # 16-bit copies for the tensor-core kernel (bf16 bits, fp16 bits)
            per_code = codebook(name.split(":")[1], "cpu")
            table = torch.cat([per_code.to(torch.bfloat16).view(torch.int16),
                               per_code.to(torch.float16).view(torch.int16)])
        else:  # "pairs:<codebook>": one 8-byte entry per byte value, so a kernel decodes a byte with one load
            per_code = codebook(name.split(":")[1], "cpu")
            pairs = torch.stack([per_code.repeat_interleave(16), per_code.repeat(16)], dim=1)  # [256, 2] (hi, lo)
            table = pairs.contiguous().view(torch.int64).reshape(256)  # little-endian: low word = high nibble
        table = table.to(device)
        _TABLES[key] = table
    return table


# --- the plain-torch reference --------------------------------------------------------------------------
def reference_scales(ops: Operands, p: Plan) -> torch.Tensor:
    """float32 scale of every (row, group) ``[out, ceil(in/group)]``, decoded the way the kernels decode it."""
    n, g = _row_group_grid(p, ops.words.device)
    index = n * p.scale_row_stride + g * p.group_step  # [out, groups] into the flattened scale tensor
    if p.double_quant:
        codes = ops.scale[index].long()
        return ops.dmap[codes] * ops.scale_absmax[index // DOUBLE_QUANT_BLOCK] + ops.scale_offset
    return ops.scale[index].float()


def _row_group_grid(p: Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = -(-p.in_features // p.group)  # the last int group may be partial
    return (torch.arange(p.out_features, device=device)[:, None], torch.arange(n_groups, device=device)[None, :])


def reference_decode(ops: Operands, p: Plan) -> torch.Tensor:
    """The float32 weight ``[out, in]`` decoded from the int32 words exactly as the kernels address them.

    Kept independent of ``QuantizedTensor.dequantize`` on purpose: the tests check this against it (equal),
    and the kernels against this, so a kernel bug and a layout misunderstanding cannot cancel out.
    """
    words = ops.words.long() & 0xFFFFFFFF  # [out, in/8] as unsigned
    # Nibble at bit 4i of a word is code 8w + (i ^ 1): byte j holds codes 2j (high nibble) and 2j + 1 (low).
    shifts = torch.tensor([4 * (i ^ 1) for i in range(CODES_PER_WORD)], device=words.device)  # code c at 4*(c^1)
    codes = (words[:, :, None] >> shifts) & 0xF  # [out, in/8, 8]
    codes = codes.reshape(p.out_features, p.in_features)
    scales = reference_scales(ops, p).repeat_interleave(p.group, dim=1)[:, : p.in_features]  # [out, in]
    if p.kind == 2:
        return ops.values[codes] * scales
    if p.kind == 1:
        n, g = _row_group_grid(p, words.device)
        g = g * p.group_step  # channel/tensor granularity: every virtual group is group 0
        packed = ops.zero.reshape(-1)[n * p.zero_row_stride + g // 2].long()  # [out, groups]
        zero = (packed >> (4 * (1 - g % 2))) & 0xF  # even group in the high nibble
        zero = zero.repeat_interleave(p.group, dim=1)[:, : p.in_features]
    else:
        zero = 8
    return (codes - zero).float() * scales


def reference_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T + b`` in float32 from the packed buffers: what both kernels compute (before the output cast)."""
    p = plan(layer)
    weight = reference_decode(operands(layer, p), p)
    y = x.float() @ weight.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y


def quantize_activations_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` (``K`` a multiple of 8) as int8 ``q [..., K]`` and one float32 scale per 8 inputs
    ``[..., K / 8]``, ``x ~ q * scale`` -- what the one-row kernel's ``XQ8`` option does to its activations,
    bit for bit.

    Each 8-input word gets the power-of-two scale ``2**(E - 6)`` (``E`` the exponent of its absmax, at least
    -95), so its absmax lands in [64, 128): the division is exact and the only loss is the rounding to an
    integer (to nearest, ties to even; 128 becomes 127) -- at most half a step of ``absmax / 64``, comparable
    to llama.cpp's int8 activation blocks (``absmax / 127`` per 32 inputs, which need a division)."""
    if x.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"int8 activations come in words of {CODES_PER_WORD}; the last dimension is {x.shape[-1]}")
    words = x.float().reshape(*x.shape[:-1], -1, CODES_PER_WORD)  # [..., K/8, 8]
    amax = words.abs().amax(dim=-1)
    exponent = (amax.view(torch.int32) >> 23).clamp(min=32)  # biased
    inv = ((260 - exponent) << 23).view(torch.float32)  # 2**(6 - E)
    scale = ((exponent - 6) << 23).view(torch.float32)  # 2**(E - 6)
    q = torch.round((words * inv[..., None]).clamp(max=127.0))  # exact product; ties to even as the kernel
    return q.to(torch.int8).reshape(x.shape), scale


def round_activations_s8(x: torch.Tensor) -> torch.Tensor:
    """``x`` through :func:`quantize_activations_s8` and back, in ``x``'s dtype: the activations an ``XQ8``
    GEMV multiplies (exact in float32; rounded once more for bf16/fp16, where ``q * scale`` with ``|q| < 128``
    fits bf16's 8 bits and fp16's 11 bits, so only scales outside their range are affected)."""
    q, scale = quantize_activations_s8(x)
    words = q.float().reshape(*x.shape[:-1], -1, CODES_PER_WORD) * scale[..., None]
    return words.reshape(x.shape).to(x.dtype)


def pack_s8_words(q: torch.Tensor) -> torch.Tensor:
    """int8 activations ``q [..., K]`` as the int32 words an ``XIN8`` GEMV reads ``[..., K / 4]``: per 8-input
    word, first the odd inputs' 4 bytes (1, 3, 5, 7: the weight words' low nibbles), then the even ones'
    (byte ``i`` = the ``i``-th of them)."""
    if q.dtype != torch.int8 or q.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"pack_s8_words takes int8 words of {CODES_PER_WORD}; got {q.dtype} {tuple(q.shape)}")
    words = q.reshape(*q.shape[:-1], -1, 4, 2)  # [..., K/8, 4 pairs, (even, odd)]
    halves = torch.stack([words[..., 1], words[..., 0]], dim=-2)  # [..., K/8, (odd, even), 4]
    return halves.contiguous().view(torch.int32).reshape(*q.shape[:-1], -1)


def unpack_s8_words(words: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`pack_s8_words`' words and their per-word scales back to the activations they stand for."""
    halves = words.reshape(*words.shape[:-1], -1, 2).contiguous().view(torch.int8)  # [..., K/8, 8]
    odd, even = halves[..., :4], halves[..., 4:]
    q = torch.stack([even, odd], dim=-1).reshape(*halves.shape[:-1], CODES_PER_WORD)
    return (q.float() * scales[..., None]).reshape(*words.shape[:-1], -1).to(dtype)
