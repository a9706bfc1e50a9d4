"""The kernels' inline PTX, checked on the CPU: a plain-Python interpreter of the few instructions they use
(MOV, AND, SHR, SHL, PRMT, LOP3; PTX ISA semantics) runs the generated text on packed bytes, and the results must
be exactly the codebook's bf16/fp16 bits (register table), ``MAG + q`` (int nibbles), or their float32 forms
(the one-row TMA kernel's decodes). The device tests (``tests/test_kernels.py``) then run the same text inside
the Triton kernels."""

from __future__ import annotations

import random

import pytest
import torch

from holdall.core.codebooks import codebook
from holdall.kernels import ptx


def _prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 (default mode): result byte i = byte ``c[4i+2:4i]`` of ``{b, a}`` (bit 3 set = sign replicate)."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = pool[sel & 7]
        if sel & 8:  # sign-replicate mode: the kernels must never select it
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32: bit k of the result is bit ``4 a_k + 2 b_k + c_k`` of ``lut`` (``lut = F(0xF0, 0xCC, 0xAA)``)."""
    out = 0
    for k in range(32):
        index = ((a >> k) & 1) << 2 | ((b >> k) & 1) << 1 | ((c >> k) & 1)
        out |= ((lut >> index) & 1) << k
    return out


def _fma16x2(a: int, b: int, c: int, bf16: bool) -> int:
    """fma.rn.{bf16x2,f16x2}: per 16-bit half, ``a * b + c`` rounded once to nearest-even (the products and
    sums the kernels form are exact in float32, so rounding float32 -> 16 bits is the one rounding)."""
    dtype = torch.bfloat16 if bf16 else torch.float16
    out = 0
    for shift in (0, 16):
        x, y, z = (torch.tensor([(v >> shift) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype).float()
                   for v in (a, b, c))
        r = (x * y + z).to(dtype).view(torch.int16).to(torch.int32).item() & 0xFFFF
        out |= r << shift
    return out


def _run(asm: str, word: int, outputs: int = 4, inputs: tuple[int, ...] = ()) -> list[int]:
    """Interpret ``asm`` with ``$<outputs> = word`` and the following operands ``inputs`` (16-bit ones as their
    bits); return ``$0..$<outputs - 1>``."""
    regs: dict[str, int] = {f"${outputs}": word}
    regs.update({f"${outputs + 1 + i}": v for i, v in enumerate(inputs)})

    def value(token: str) -> int:
        token = token.strip()
        if token in regs:
            return regs[token]
        if token.startswith("0f"):  # a float32 immediate, as its bits
            return int(token[2:], 16)
        return int(token, 16) if token.lower().startswith("0x") else int(token)

    for ins in filter(None, (i.strip().strip("{}").strip() for i in asm.split(";"))):
        if ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if op == "mov.b32" and "{" in rest:  # pack two 16-bit registers, or split one 32-bit register in two
            left, right = (part.strip() for part in rest.split(",", 1)) if not rest.startswith("{") else \
                (rest[:rest.index("}") + 1], rest[rest.index("}") + 2:].strip())
            if left.startswith("{"):
                lo, hi = (r.strip() for r in left.strip("{}").split(","))
                regs[lo], regs[hi] = value(right) & 0xFFFF, value(right) >> 16
            else:
                lo, hi = (value(r) for r in right.strip("{}").split(","))
                regs[left] = (lo & 0xFFFF) | (hi & 0xFFFF) << 16
            continue
        args = [a.strip() for a in rest.split(",")]
        dst, src = args[0], [value(a) for a in args[1:]]
        if op == "mov.b32":
            regs[dst] = src[0] & 0xFFFFFFFF
        elif op == "and.b32":
            regs[dst] = src[0] & src[1]
        elif op == "shr.u32":
            regs[dst] = src[0] >> src[1]
        elif op == "shl.b32":
            regs[dst] = (src[0] << src[1]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            regs[dst] = _prmt(*src)
        elif op == "lop3.b32":
            regs[dst] = _lop3(*src)
        elif op == "add.rn.f32":  # float32 add, rounded to nearest even (torch's float32 add is IEEE)
            f = torch.tensor(src, dtype=torch.int64).to(torch.int32).view(torch.float32)
            regs[dst] = int((f[0] + f[1]).view(torch.int32)) & 0xFFFFFFFF
        elif op == "dp4a.u32.s32":  # c + sum of unsigned bytes of a times signed bytes of b
            total = src[2] + sum(((src[0] >> (8 * i)) & 0xFF) * (((src[1] >> (8 * i)) & 0xFF ^ 0x80) - 0x80)
                                 for i in range(4))
            regs[dst] = total & 0xFFFFFFFF
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            regs[dst] = _fma16x2(*src, bf16=op == "fma.rn.bf16x2")
        else:
            raise AssertionError(f"instruction outside the interpreter's subset: {op}")
    return [regs[f"${i}"] for i in range(outputs)]


def _words(count: int = 600) -> list[list[int]]:
    """4-byte groups: every byte value in every position, plus random ones."""
    rng = random.Random(0)
    out = [[(v + 37 * i) % 256 for i in range(4)] for v in range(256)]
    out += [[rng.randrange(256) for _ in range(4)] for _ in range(count)]
    return out


def _halves(regs: list[int]) -> tuple[list[int], list[int]]:
    """``$0, $1`` -> the 4 high-nibble results; ``$2, $3`` -> the 4 low-nibble results (16 bits each, low half
    first: element i of the packed input)."""
    split = [(r >> s) & 0xFFFF for r in regs for s in (0, 16)]
    return split[:4], split[4:]


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_nibbles_are_exact_magic_plus_code(bf16):
    asm = ptx.nibbles_asm(bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    mag = 128.0 if bf16 else 1024.0
    want = [int(torch.tensor(mag + q, dtype=dtype).view(torch.int16)) & 0xFFFF for q in range(16)]
    for four in _words():
        hi, lo = _halves(_run(asm, sum(b << (8 * i) for i, b in enumerate(four))))
        assert hi == [want[b >> 4] for b in four]
        assert lo == [want[b & 0xF] for b in four]


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_centered_nibbles_are_the_exact_symmetric_codes(bf16):
    """The tensor-core GEMV's decode: stored nibble ``n`` becomes the 16-bit float ``n - 8``, in
    ``nibbles_asm``'s pair layout."""
    asm = ptx.centered_nibbles_asm(bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    want = [int(torch.tensor(n - 8.0, dtype=dtype).view(torch.int16)) & 0xFFFF for n in range(16)]
    for four in _words():
        hi, lo = _halves(_run(asm, sum(b << (8 * i) for i, b in enumerate(four))))
        assert hi == [want[b >> 4] for b in four]
        assert lo == [want[b & 0xF] for b in four]


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_register_table_is_the_codebook(name, bf16):
    asm = ptx.table_asm(name, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    bits = (codebook(name).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    assert len(set(bits)) >= 15  # few repeats for a wrong entry to hide behind (FP4 has +0 twice)
    for four in _words():
        hi, lo = _halves(_run(asm, sum(b << (8 * i) for i, b in enumerate(four))))
        assert hi == [bits[b >> 4] for b in four], four
        assert lo == [bits[b & 0xF] for b in four], four


def test_f32_nibbles_are_exact_128_plus_code():
    """Every code of a word, in input order (high nibble of byte j = input 2j), as the float32 128 + q."""
    asm = ptx.nibbles_f32_asm()
    for four in _words():
        word = sum(b << (8 * i) for i, b in enumerate(four))
        got = torch.tensor(_run(asm, word, outputs=8), dtype=torch.int64).to(torch.int32).view(torch.float32)
        codes = [c for b in four for c in (b >> 4, b & 0xF)]
        assert got.tolist() == [128.0 + q for q in codes], four


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_f32_register_table_is_the_bf16_codebook(name):
    """Every code of a word, in input order, as the float32 widening of the codebook's bf16 value."""
    asm = ptx.table_f32_asm(name)
    want = codebook(name).to(torch.bfloat16).float().tolist()
    for four in _words():
        word = sum(b << (8 * i) for i, b in enumerate(four))
        got = torch.tensor(_run(asm, word, outputs=8), dtype=torch.int64).to(torch.int32).view(torch.float32)
        assert got.tolist() == [want[c] for b in four for c in (b >> 4, b & 0xF)], four


def _bits16(values, dtype) -> list[int]:
    return (torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", [None, "nf4", "fp4"], ids=["int", "nf4", "fp4"])
def test_fold16_is_the_scaled_code_rounded_once(name, bf16):
    """The round-6 GEMM's decode: every code of a word, in input order, scaled (int: minus the zero point
    first) and rounded once to the activation dtype -- bit for bit what torch gives for the same 16-bit scale."""
    asm = ptx.fold16_asm(name, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    mag = 128.0 if bf16 else 1024.0
    rng = random.Random(1)
    values = codebook(name).to(dtype).float().tolist() if name else None
    for n, four in enumerate(_words(300)):
        word = sum(b << (8 * i) for i, b in enumerate(four))
        scale = torch.tensor(rng.choice([0.013, 0.5, 3.7e-3, 1.9, 2.4e-4]) * (1 + n / 997), dtype=dtype)
        zero = rng.randrange(16)
        codes = [c for b in four for c in (b >> 4, b & 0xF)]
        if name is None:
            want = [(q - zero) * scale.float().item() for q in codes]
            inputs = (_bits16([scale.float().item()], dtype)[0], _bits16([-(mag + zero)], dtype)[0])
        else:
            want = [values[q] * scale.float().item() for q in codes]
            inputs = (_bits16([scale.float().item()], dtype)[0], 0)
        assert _run(asm, word, outputs=8, inputs=inputs) == _bits16(want, dtype), (four, scale, zero)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", [None, "nf4", "fp4"], ids=["int", "nf4", "fp4"])
def test_scaled_pairs_are_the_tensor_core_operands(name, bf16):
    """The tensor-core GEMV's decode for codes with their own scale: the four pairs in the centred decode's
    order ((0, 2), (4, 6), (1, 3), (5, 7) of the word's input positions), each code's value (``n - 8``, or the
    codebook's 16-bit value) times the 16-bit scale, rounded once -- bit for bit what torch gives."""
    asm = ptx.scaled_pairs_asm(name, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    rng = random.Random(2)
    values = codebook(name).to(dtype).float().tolist() if name else [float(n - 8) for n in range(16)]
    for n, four in enumerate(_words(300)):
        word = sum(b << (8 * i) for i, b in enumerate(four))
        scale = torch.tensor(rng.choice([0.013, 0.5, 3.7e-3, 1.9, 2.4e-4]) * (1 + n / 997), dtype=dtype)
        codes = [c for b in four for c in (b >> 4, b & 0xF)]  # input order: a byte's high nibble first
        scaled = _bits16([values[q] * scale.float().item() for q in codes], dtype)
        got = _run(asm, word, outputs=4, inputs=(_bits16([scale.float().item()], dtype)[0],))
        want = [scaled[a] | scaled[b] << 16 for a, b in ((0, 2), (4, 6), (1, 3), (5, 7))]
        assert got == want, (name, four, scale)


def test_interpreter_catches_a_wrong_selector():
    """The check can fail: one swapped PRMT selector in the generated text is caught."""
    asm = ptx.table_asm("nf4", True).replace("0x7351", "0x7315", 1)
    bits = (codebook("nf4").to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    four = [0x12, 0x34, 0x56, 0x78]
    hi, _ = _halves(_run(asm, sum(b << (8 * i) for i, b in enumerate(four))))
    assert hi != [bits[b >> 4] for b in four]


def _f32_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF


def test_int8_activation_packing_is_the_reference_rounding():
    """``quantize_s8_asm``: 8 scaled activations -> int8 (nearest, ties to even) packed odd inputs / even inputs,
    and their sum, equal to ``packed.quantize_activations_s8`` on the same words."""
    from holdall.kernels import packed

    rng = random.Random(1)
    asm = ptx.quantize_s8_asm()
    for _ in range(300):
        x = torch.tensor([rng.choice([rng.uniform(-3, 3), rng.randrange(-16, 16) / 8 + 1 / 16]) for _ in range(8)])
        q, scale = packed.quantize_activations_s8(x)
        scaled = [min(float(v) / float(scale[0]), 127.0) for v in x]  # exact: a power-of-two scale
        odd, even, total = _run_quantize(asm, scaled)
        want = [int(v) & 0xFF for v in q]
        assert odd == sum(want[2 * i + 1] << (8 * i) for i in range(4))
        assert even == sum(want[2 * i] << (8 * i) for i in range(4))
        assert (total ^ 0x80000000) - 0x80000000 == int(q.sum())


def _run_quantize(asm: str, scaled: list[float]) -> list[int]:
    """$0..$2 of the quantize PTX with ``$3..$10`` = the 8 scaled activations (as float32 bits)."""
    bits = [_f32_bits(v) for v in scaled]
    return _run(asm, bits[0], outputs=3, inputs=tuple(bits[1:]))


def test_int8_dot_is_the_integer_dot_product():
    """``dot_s8_asm``: ``c + sum_c q_c x_c`` for the 8 codes of a word (code c at bit 4 (c ^ 1)) and the int8
    activations packed as :func:`test_int8_activation_packing_is_the_reference_rounding` checks."""
    rng = random.Random(2)
    asm = ptx.dot_s8_asm()
    for _ in range(500):
        codes = [rng.randrange(16) for _ in range(8)]
        xs = [rng.randrange(-128, 128) for _ in range(8)]
        c = rng.randrange(-2**20, 2**20) + ptx.MAGIC_INT
        word = sum(code << (4 * (i ^ 1)) for i, code in enumerate(codes))
        odd = sum((xs[2 * i + 1] & 0xFF) << (8 * i) for i in range(4))
        even = sum((xs[2 * i] & 0xFF) << (8 * i) for i in range(4))
        (got,) = _run(asm, word, outputs=1, inputs=(odd, even, c))
        assert got == (c + sum(q * x for q, x in zip(codes, xs))) & 0xFFFFFFFF


def _half_bits(values: torch.Tensor, bf16: bool) -> list[int]:
    """16-bit float bits of ``values`` (exactly representable)."""
    dtype = torch.bfloat16 if bf16 else torch.float16
    return [int(v) & 0xFFFF for v in values.to(dtype).view(torch.int16)]


def _as_float(bits: int, bf16: bool) -> float:
    dtype = torch.bfloat16 if bf16 else torch.float16
    return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).float())


def _mma_16x8x16(a_regs: list[list[int]], b_regs: list[list[int]], bf16: bool) -> torch.Tensor:
    """``mma.sync.m16n8k16.row.col`` from the 32 lanes' registers (PTX ISA fragment layout: lane ``4 g + c``
    holds A rows ``g`` / ``g + 8`` at k ``2 c, 2 c + 1`` (``a0``, ``a1``) and ``2 c + 8, 2 c + 9`` (``a2``,
    ``a3``), B column ``g`` at k ``2 c, 2 c + 1`` (``b0``) and ``2 c + 8, 2 c + 9`` (``b1``), low half first),
    in float64: ``[16, 8]``."""
    a, b = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, c = divmod(lane, 4)
        for reg, (row, k) in enumerate([(g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)]):
            a[row, k] = _as_float(a_regs[lane][reg] & 0xFFFF, bf16)
            a[row, k + 1] = _as_float(a_regs[lane][reg] >> 16 & 0xFFFF, bf16)
        for reg, k in enumerate([2 * c, 2 * c + 8]):
            b[k, g] = _as_float(b_regs[lane][reg] & 0xFFFF, bf16)
            b[k + 1, g] = _as_float(b_regs[lane][reg] >> 16 & 0xFFFF, bf16)
    return a @ b


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
@pytest.mark.parametrize("columns", [1, 8])
def test_tensor_core_fragment_order_is_the_dot_product(bf16, columns):
    """The tensor-core GEMV's plan for one 16-row tile and one 128-input chunk, run lane by lane on the PTX it
    emits (``centered_nibbles_asm`` through the interpreter, the B registers by PRMT with ``B0_SEL`` /
    ``B1_SEL``) and a model of ``mma.m16n8k16``'s fragment layout: thread ``(g, c)`` feeds word ``4 c + i`` of rows
    ``g`` and ``g + 8`` to steps ``(i, p)`` in the order the decode leaves the codes, and its activations in the
    same order, so the 8 steps give ``sum (n - 8) x`` exactly (float64 on exact 16-bit inputs) for every row and
    column; ``columns`` 8: lane ``g`` feeds activation row ``g`` (several rows per launch)."""
    from holdall.kernels import gluon_mma

    gen = torch.Generator().manual_seed(3 + columns)
    codes = torch.randint(0, 16, (16, 128), generator=gen)  # stored q + 8
    x = torch.randn(8, 128, generator=gen).to(torch.bfloat16 if bf16 else torch.float16).double()
    if columns == 1:
        x[1:] = x[0]
    words = [[sum(((int(codes[r, 8 * w + 2 * j]) << 4 | int(codes[r, 8 * w + 2 * j + 1])) << (8 * j))
                  for j in range(4)) for w in range(16)] for r in range(16)]
    xbits = [_half_bits(x[n], bf16) for n in range(8)]
    asm = ptx.centered_nibbles_asm(bf16)
    total = torch.zeros(16, 8, dtype=torch.float64)
    for i in range(4):  # word i of each thread's four
        pairs = {(r, c): _run(asm, words[r][4 * c + i]) for r in range(16) for c in range(4)}
        for p in range(2):
            a_regs, b_regs = [], []
            for lane in range(32):
                g, c = divmod(lane, 4)
                a_regs.append([pairs[g, c][p], pairs[g + 8, c][p], pairs[g, c][p + 2], pairs[g + 8, c][p + 2]])
                base = 32 * c + 8 * i + 4 * p  # the thread's activation pairs (x[b], x[b+1]), (x[b+2], x[b+3])
                x01 = xbits[g][base] | xbits[g][base + 1] << 16
                x23 = xbits[g][base + 2] | xbits[g][base + 3] << 16
                b_regs.append([_prmt(x01, x23, gluon_mma.B0_SEL), _prmt(x01, x23, gluon_mma.B1_SEL)])
            total += _mma_16x8x16(a_regs, b_regs, bf16)
    want = (codes.double() - 8) @ x.T  # [16 rows, 8 columns]
    assert torch.equal(total, want)
