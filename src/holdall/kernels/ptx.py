"""Inline-PTX text for the Triton kernels' decodes, generated in Python (torch only, no Triton or GPU needed).

Kept apart from ``triton_wq4`` so that the exact instructions the kernels run can be checked on any machine:
``tests/test_ptx.py`` interprets them (PRMT, LOP3, AND, shifts) in plain Python against the codebooks and the
nibble layout, and the device tests then run them inside the kernels.

The 16-bit blocks take 4 packed bytes in ``$4`` (byte ``i`` = bits ``8i..8i+7``; a byte holds an even input's code
in its high nibble and the next input's in its low nibble) and return four 16-bit floats per output pair:
``$0, $1`` = the high nibbles' values of bytes (0, 1) and (2, 3), ``$2, $3`` = the low nibbles'.
:func:`nibbles_f32_asm` and :func:`table_f32_asm` take one int32 word in ``$8`` and return its 8 codes as
float32 in ``$0..$7``, in input order; :func:`fold16_asm` returns them already scaled, as 16-bit floats.
:func:`quantize_s8_asm` packs a word's 8 scaled activations as int8 and :func:`dot_s8_asm` multiplies a word's 8
int codes by them with DP4A (the ``XQ8`` GEMV: int8 activations).
"""

from __future__ import annotations

import torch

from ..core.codebooks import codebook

#: The exponent byte that makes ``byte | q`` the 16-bit float ``MAG + q``: bf16 ``0x43`` (128), fp16 ``0x64`` (1024).
MAGIC_BYTE = {True: 0x43, False: 0x64}


def nibbles_asm(bf16: bool) -> str:
    """Int codes as the exact 16-bit floats ``MAG + q``, two codes per instruction: one AND (one shift + AND for
    the high nibbles) isolates four codes, and each PRMT interleaves two of them with the exponent byte -- 7
    instructions per 8 codes."""
    magic = MAGIC_BYTE[bf16] * 0x01010101
    return ("{.reg .b32 t, m;"
            f"mov.b32 m, 0x{magic:08X};"
            "and.b32 t, $4, 0x0F0F0F0F; prmt.b32 $2, t, m, 0x4140; prmt.b32 $3, t, m, 0x4342;"
            "shr.u32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, m, 0x4140; prmt.b32 $1, t, m, 0x4342;}")


#: 16-bit float bits of 1.0 and of ``-(MAG + 8)`` (bf16 ``-136``, fp16 ``-1032``): ``(MAG + n) - (MAG + 8)`` is the
#: symmetric code ``q = n - 8`` of a stored nibble ``n``, exactly.
ONE_BITS = {True: 0x3F80, False: 0x3C00}
NEG_MAG8_BITS = {True: 0xC308, False: 0xE408}


def centered_nibbles_asm(bf16: bool) -> str:
    """Symmetric int codes as the exact 16-bit floats ``q = n - 8`` (``n`` the stored nibble), laid out as
    :func:`nibbles_asm`'s pairs: its 7 instructions per 8 codes, then one packed ``fma`` per pair (``x 1 -
    (MAG + 8)``, exact: small integers) -- 11 per 8 codes, ready to be an MMA's operand with no offset left to
    take off."""
    kind = "bf16x2" if bf16 else "f16x2"
    one, neg = (bits * 0x00010001 for bits in (ONE_BITS[bf16], NEG_MAG8_BITS[bf16]))
    body = nibbles_asm(bf16)[1:-1]  # without its braces: one scope for all the registers
    centre = "".join(f"fma.rn.{kind} ${k}, ${k}, o, n;" for k in range(4))
    return ("{.reg .b32 o, n;" + body + f"mov.b32 o, 0x{one:08X}; mov.b32 n, 0x{neg:08X};" + centre + "}")


def scaled_pairs_asm(name: str | None, bf16: bool) -> str:
    """The 8 codes of the word ``$4``, scaled by the 16-bit scale ``$5``, as four 16-bit float pairs in
    :func:`nibbles_asm`'s layout (``$0 = (0, 2)``, ``$1 = (4, 6)``, ``$2 = (1, 3)``, ``$3 = (5, 7)``): symmetric
    int codes (``name`` None) centred exactly (:func:`centered_nibbles_asm`), codebook codes looked up in
    registers (:func:`table_asm`), then one packed ``fma`` with the scale (and -0.0) per pair, rounding once.
    The tensor-core GEMV's decode when a thread's codes carry their own scale (groups of 32 / 64 inputs,
    codebooks): the MMAs then sum scaled weights, as the round-6 GEMM's ``FOLD16`` does."""
    kind = "bf16x2" if bf16 else "f16x2"
    if name is None:
        decode = centered_nibbles_asm(bf16)[1:-1]
    else:
        decode = _table_body(name, bf16, "$4", ("$0", "$1", "$2", "$3"))
    scale = "".join(f"fma.rn.{kind} ${k}, ${k}, s2, nz;" for k in range(4))
    return ("{.reg .b32 s2, nz;" + decode + f"mov.b32 s2, {{$5, $5}}; mov.b32 nz, 0x{_NEG_ZERO2:08X};" + scale + "}")


def nibbles_f32_asm() -> str:
    """The 8 int codes of a word as the exact float32 ``128 + q``, one PRMT per code: ``$c`` = input ``8w + c``
    (code ``2j`` is byte ``j``'s high nibble, ``2j + 1`` its low nibble). One AND, or a shift and an AND,
    isolates four codes as bytes; each PRMT puts one of them in mantissa bits 16..19 under the exponent byte
    ``0x43`` (float32 ``0x43000000`` = 128) and zeros below: 11 instructions per 8 codes (and one ``mov`` of
    the constant), no conversion."""
    out = ["{.reg .b32 h, l, m;", "mov.b32 m, 0x43;",
           "shr.u32 h, $8, 4; and.b32 h, h, 0x0F0F0F0F; and.b32 l, $8, 0x0F0F0F0F;"]
    for j in range(4):
        # result bytes (low to high): 0 (byte 5 of {0x43, src}), 0, source byte j, 0x43 (byte 4)
        out.append(f"prmt.b32 ${2 * j}, h, m, 0x4{j}55; prmt.b32 ${2 * j + 1}, l, m, 0x4{j}55;")
    return "".join(out) + "}"


def table_asm(name: str, bf16: bool) -> str:
    """Codes looked up in the 16-entry codebook ``name``, held in registers as immediates.

    The table's 16-bit values are split into low bytes ``L0..L3`` and high bytes ``H0..H3`` (entry ``i`` at byte
    ``i % 4`` of register ``i // 4``). A PRMT picks 4 of 8 bytes by 3-bit selectors, so for 2 input bytes (4
    codes): the codes' low 3 bits index entries 0-7 and 8-15 of each byte table (4 PRMTs), a PRMT of 0 / -1
    turns bit 3 into a byte mask that chooses between them (2 LOP3 ``c ? b : a``, immediate 0xD8), and 2 PRMTs
    lay the low and high bytes out as two 16-bit floats per register: ~3 instructions per code, no memory.
    """
    return "{" + _table_body(name, bf16, "$4", ("$0", "$1", "$2", "$3")) + "}"


def table_f32_asm(name: str) -> str:
    """The 8 codes of a word (``$8``) looked up in the codebook ``name`` as float32 ``$0..$7``, in input order:
    the bf16 register table of :func:`table_asm` (its values rounded to bf16, ~2**-9 relative: far below the
    codebook's own rounding), then one shift or AND per code widens a bf16 half to float32 (bf16 is the top
    half of a float32)."""
    widen = []
    for j, (pair, upper) in enumerate([("p0", False), ("p0", True), ("p1", False), ("p1", True)]):
        for k, src in enumerate((pair, "p2" if pair == "p0" else "p3")):  # high nibble (even input), then low
            out = f"${2 * j + k}"
            widen.append(f"and.b32 {out}, {src}, 0xFFFF0000;" if upper else f"shl.b32 {out}, {src}, 16;")
    return ("{.reg .b32 p0, p1, p2, p3;" + _table_body(name, True, "$8", ("p0", "p1", "p2", "p3"))
            + "".join(widen) + "}")


#: 16-bit float bits of 1.0 and -0.0, two per register: bf16, then fp16.
_ONE2 = {True: 0x3F803F80, False: 0x3C003C00}
_NEG_ZERO2 = 0x80008000


def fold16_asm(name: str | None, bf16: bool) -> str:
    """The 8 codes of the word ``$8``, scaled, as 16-bit floats ``$0..$7`` in input order: int codes (``name``
    None) ``(q - zero) * s``, codebook codes ``value * s``, two codes per instruction.

    ``$9`` is the scale and ``$10`` ``-(MAG + zero)`` (int codes; ``MAG`` 128 bf16 / 1024 fp16), both 16-bit
    floats of the activation dtype. The int codes are built as the exact ``MAG + q`` (:func:`nibbles_asm`) and
    a codebook's values looked up in registers (:func:`table_asm`), two per register; one paired FMA with 1.0
    takes ``MAG + zero`` off (exact: small integers) and one with the scale (and -0.0) scales them, rounding
    once. Per 8 codes: 7 (int) or ~22 (codebook) decode instructions, then 4 FMAs (int: 8); the packed pairs
    are split into 16-bit registers by moves the compiler folds away. The scale is rounded to the activation
    dtype first (~2**-9 relative in bf16, shared by a group's weights)."""
    fma = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
    regs = ".reg .b32 p0, p1, p2, p3, s2, c2, one, nz;"
    head = f"mov.b32 s2, {{$9, $9}}; mov.b32 nz, 0x{_NEG_ZERO2:08X};"
    if name is None:
        magic = MAGIC_BYTE[bf16] * 0x01010101
        body = (f"{{.reg .b32 t, m; mov.b32 m, 0x{magic:08X};"
                "and.b32 t, $8, 0x0F0F0F0F; prmt.b32 p2, t, m, 0x4140; prmt.b32 p3, t, m, 0x4342;"
                "shr.u32 t, $8, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 p0, t, m, 0x4140; prmt.b32 p1, t, m, 0x4342;}")
        offset = f"mov.b32 c2, {{$10, $10}}; mov.b32 one, 0x{_ONE2[bf16]:08X};" + "".join(
            f"{fma} p{i}, p{i}, one, c2;" for i in range(4))
    else:
        body = "{" + _table_body(name, bf16, "$8", ("p0", "p1", "p2", "p3")) + "}"
        offset = ""
    scale = "".join(f"{fma} p{i}, p{i}, s2, nz;" for i in range(4))
    # p0 = (high nibbles of bytes 0, 1) = inputs (0, 2); p1 = (4, 6); p2 = low nibbles = (1, 3); p3 = (5, 7)
    split = "mov.b32 {$0, $2}, p0; mov.b32 {$4, $6}, p1; mov.b32 {$1, $3}, p2; mov.b32 {$5, $7}, p3;"
    return "{" + regs + head + body + offset + scale + split + "}"


def _table_body(name: str, bf16: bool, src_reg: str, outs: tuple[str, str, str, str]) -> str:
    """PTX of the register-table lookup (see :func:`table_asm`) from ``src_reg`` into ``outs``: the high
    nibbles' 16-bit values of bytes (0, 1) and (2, 3), then the low nibbles'."""
    bits = (codebook(name).to(torch.bfloat16 if bf16 else torch.float16).view(torch.int16).to(torch.int32)
            & 0xFFFF).tolist()
    lo_bytes, hi_bytes = [b & 0xFF for b in bits], [b >> 8 for b in bits]

    def word(four: list[int]) -> str:
        return f"0x{four[0] | four[1] << 8 | four[2] << 16 | four[3] << 24:08X}"

    movs = "".join(f"mov.b32 L{i}, {word(lo_bytes[4 * i:4 * i + 4])}; mov.b32 H{i}, {word(hi_bytes[4 * i:4 * i + 4])};"
                   for i in range(4))

    def half(src: str, out_hi: str, out_lo: str) -> str:
        # selector nibbles of src[15:0], in order: byte0.lo, byte0.hi, byte1.lo, byte1.hi
        return (f"and.b32 s, {src}, 0x7777; shr.u32 t, {src}, 1; and.b32 t, t, 0x4444; prmt.b32 m, z, f, t;"
                "prmt.b32 a, L0, L1, s; prmt.b32 b, L2, L3, s; lop3.b32 lo, a, b, m, 0xD8;"
                "prmt.b32 a, H0, H1, s; prmt.b32 b, H2, H3, s; lop3.b32 hi, a, b, m, 0xD8;"
                f"prmt.b32 {out_hi}, lo, hi, 0x7351; prmt.b32 {out_lo}, lo, hi, 0x6240;")

    return (".reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, s, t, m, a, b, lo, hi, z, f, w;"
            + movs + "mov.b32 z, 0; mov.b32 f, 0xFFFFFFFF;"
            + half(src_reg, outs[0], outs[2]) + f"shr.u32 w, {src_reg}, 16;" + half("w", outs[1], outs[3]))


#: float32 ``1.5 * 2**23``: adding it to a float of magnitude < 2**22 puts the value, rounded to an integer, in
#: the low mantissa bits (two's complement), and its bits read back as an int are ``MAGIC_INT + value``.
MAGIC_F32 = 12582912.0
MAGIC_INT = 0x4B400000


def quantize_s8_asm() -> str:
    """Eight activations of a word, already divided by their power-of-two scale and capped at 127 (float32
    ``$3..$10``, input order; :func:`holdall.kernels.packed.quantize_activations_s8`), as int8: ``$0`` packs the
    odd inputs (1, 3, 5, 7: the words' low nibbles), ``$1`` the even ones (0, 2, 4, 6: the high nibbles), byte
    ``i`` the ``i``-th of them; ``$2`` is their sum. Each value is rounded to
    the nearest integer (ties to even) by ``add.rn`` of :data:`MAGIC_F32` (``.rn`` keeps ptxas from fusing it
    with the multiply before it), two PRMTs per pair and one per four gather the low bytes, two DP4As with
    ones sum them: 8 + 6 + 2 instructions per word."""
    adds = "".join(f"add.rn.f32 t{i}, ${i + 3}, 0f{MAGIC_INT:08X};" for i in range(8))  # + MAGIC_F32
    return ("{.reg .f32 t0, t1, t2, t3, t4, t5, t6, t7; .reg .b32 a, b, one, z;" + adds
            + "prmt.b32 a, t1, t3, 0x0040; prmt.b32 b, t5, t7, 0x0040; prmt.b32 $0, a, b, 0x5410;"
            + "prmt.b32 a, t0, t2, 0x0040; prmt.b32 b, t4, t6, 0x0040; prmt.b32 $1, a, b, 0x5410;"
            + "mov.b32 one, 0x01010101; mov.b32 z, 0; dp4a.u32.s32 $2, one, $0, z; dp4a.u32.s32 $2, one, $1, $2;}")


def dot_s8_asm() -> str:
    """``$0 = $4 + sum_c q_c x_c`` over the 8 int codes of the word ``$1`` and the int8 activations of
    :func:`quantize_s8_asm` (``$2`` odd inputs, ``$3`` even ones): one AND isolates the low nibbles (codes of
    the odd inputs) as unsigned bytes, a shift and an AND the high ones, and two DP4As (4 unsigned x signed
    byte products each) accumulate them: 5 instructions per 8 codes."""
    return ("{.reg .b32 l, h;"
            "and.b32 l, $1, 0x0F0F0F0F; shr.u32 h, $1, 4; and.b32 h, h, 0x0F0F0F0F;"
            "dp4a.u32.s32 $0, l, $2, $4; dp4a.u32.s32 $0, h, $3, $0;}")
