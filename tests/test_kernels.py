"""The 4-bit Triton kernels (holdall.kernels) against their plain-torch reference, and the dispatch rules.

CUDA tests skip unless a GPU and Triton are present (CI's CPU run skips them with that reason); the CPU tests
check the reference decode and that the registration never routes CPU tensors to a kernel.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from holdall.core import backends
from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.kernels import dispatch, packed

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON),
    reason="the Triton kernels need a CUDA GPU and triton (run on the device machine)",
)

SCHEMES = {
    "int4-sym": QuantScheme(),
    "int4-asym": QuantScheme(symmetric=False),
    "nf4": QuantScheme(dtype="nf4", group_size=64),
    "nf4-dq": QuantScheme(dtype="nf4", group_size=64, double_quant=True),
}
# Formats beyond the four the issue names, which the same kernels read: dq int scales, bf16 scales, g32,
# channel granularity, fp4.
EXTRA_SCHEMES = {
    "int4-asym-dq": QuantScheme(symmetric=False, double_quant=True),
    "int4-g32-bf16": QuantScheme(group_size=32, scale_dtype="bfloat16"),
    "int4-ch-asym": QuantScheme(granularity="channel", symmetric=False),
    "fp4": QuantScheme(dtype="fp4", group_size=64),
    "int4-g256-asym": QuantScheme(group_size=256, symmetric=False),
}


def _layer(out_f: int, in_f: int, scheme: QuantScheme, device: str = "cpu", bias: bool = True, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return QuantLinear.from_linear(linear.to(device), scheme)


# --- CPU: reference decode and dispatch rules -----------------------------------------------------------
def test_int8_words_pack_and_unpack():
    """``packed.pack_s8_words``: per 8 inputs the odd inputs' int8 in one int32 (byte i = input 2i + 1), then the
    even ones' -- the order the ``XIN8`` GEMV reads and a ``Q8_OUT`` GEMV writes; ``unpack_s8_words`` inverts it
    to the rounded activations."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5
    q, scales = packed.quantize_activations_s8(x)
    words = packed.pack_s8_words(q)
    assert words.dtype == torch.int32 and words.shape == (3, 16)
    for r in range(3):
        for w in range(8):
            odd, even = int(words[r, 2 * w]) & 0xFFFFFFFF, int(words[r, 2 * w + 1]) & 0xFFFFFFFF
            for i in range(4):
                assert (odd >> 8 * i) & 0xFF == int(q[r, 8 * w + 2 * i + 1]) & 0xFF
                assert (even >> 8 * i) & 0xFF == int(q[r, 8 * w + 2 * i]) & 0xFF
    assert torch.equal(packed.unpack_s8_words(words, scales, torch.float32), packed.round_activations_s8(x))
    with pytest.raises(ValueError, match="int8 words"):
        packed.pack_s8_words(torch.zeros(12, dtype=torch.int8))


def test_int8_activations_are_power_of_two_words():
    """``packed.quantize_activations_s8`` (the ``XQ8`` kernels' rounding, bit for bit) against a plain-Python
    reference: per word of 8, scale ``2**(e - 7)`` for ``absmax = m * 2**e`` (``math.frexp``, ``m`` in
    [0.5, 1)), codes ``round-half-even(x / scale)`` capped at 127; zeros, tiny, huge and tied values."""
    import math

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.logspace(-6, 6, 6)[:, None]
    x[0, :8] = 0.0
    # absmax near 2: step 1/64, ties at 3/128 and 5/128
    x[1, 8:16] = torch.tensor([1.0, -1.0, 0.5, 1 / 64, 3 / 128, 5 / 128, -7 / 128, 1.999])
    x[2, 16:24] = 1e-35  # below the floor exponent
    q, scale = packed.quantize_activations_s8(x)
    assert q.dtype == torch.int8 and scale.shape == (6, 8)
    for r in range(6):
        for w in range(8):
            vals = [float(v) for v in x[r, 8 * w:8 * w + 8]]
            e = math.frexp(max(abs(v) for v in vals))[1] if any(vals) else -200
            step = max(2.0 ** (e - 7), 2.0 ** (32 - 127 - 6))
            assert float(scale[r, w]) == step
            for c, v in enumerate(vals):
                assert int(q[r, 8 * w + c]) == min(round(v / step), 127), (r, w, c, v)
    back = packed.round_activations_s8(x)
    assert torch.equal(back, q.float() * scale.repeat_interleave(8, dim=1))
    with pytest.raises(ValueError, match="words of 8"):
        packed.quantize_activations_s8(torch.ones(12))


@pytest.mark.parametrize("name", list(SCHEMES) + list(EXTRA_SCHEMES))
@pytest.mark.parametrize("in_f", [256, 328])
def test_reference_decode_is_dequantize(name, in_f):
    scheme = {**SCHEMES, **EXTRA_SCHEMES}[name]
    layer = _layer(24, in_f, scheme)
    reason = packed.why_unsupported(layer)
    if scheme.is_codebook and in_f % scheme.group_size:
        assert reason is not None and "straddle" in reason
        return
    assert reason is None
    p = packed.plan(layer)
    decoded = packed.reference_decode(packed.operands(layer, p), p)
    assert torch.equal(decoded, layer.dequantize_weight(torch.float32))


def test_unsupported_formats_say_why():
    assert "4-bit" in packed.why_unsupported(_layer(8, 64, QuantScheme(bits=8)))
    assert "multiple of 8" in packed.why_unsupported(_layer(8, 60, QuantScheme(group_size=32)))
    assert "power of two" in packed.why_unsupported(_layer(8, 192, QuantScheme(group_size=96)))


def test_cpu_tensors_never_pick_the_kernel():
    from holdall import kernels

    layer = _layer(16, 128, SCHEMES["int4-sym"])
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert kernels.enable(force=True)  # registered even without triton: the predicate is what is tested
    try:
        assert dispatch.BACKEND in backends.available_backends()
        assert not dispatch.supports(layer, x)
        assert backends.select_backend(layer, x) is backends.reference_forward
        y = layer(x)
        assert torch.equal(y, backends.reference_forward(layer, x))
    finally:
        kernels.disable()
    assert dispatch.BACKEND not in backends.available_backends()


def test_import_and_cpu_forward_stay_light():
    """`import holdall` and a CPU forward load neither holdall.kernels nor triton."""
    code = textwrap.dedent(
        """
        import sys, torch, holdall
        from holdall.core.linear import QuantLinear
        from holdall.core.scheme import QuantScheme
        layer = QuantLinear.from_linear(torch.nn.Linear(64, 8), QuantScheme(group_size=32))
        layer(torch.randn(1, 64))
        print([m for m in ("holdall.kernels", "triton") if m in sys.modules])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- CUDA: kernels vs reference -------------------------------------------------------------------------
SHAPES = [(11008, 4096), (4096, 11008), (40, 256)]  # [out, in]; the small one has a partial row block
ROWS = [1, 3, 17, 64]
_LAYERS: dict = {}


def _cuda_layer(out_f, in_f, name):
    key = (out_f, in_f, name)
    if key not in _LAYERS:
        _LAYERS.clear()  # one big layer at a time keeps GPU memory small
        scheme = {**SCHEMES, **EXTRA_SCHEMES}[name]
        _LAYERS[key] = _layer(out_f, in_f, scheme, device="cuda", seed=out_f + in_f)
    return _LAYERS[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# bf16 output rounding alone is ~2e-3 relative; fp16 ~3e-4. Kernels accumulate in fp32.
TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3}


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_reference(shape, name, rows, dtype):
    from holdall import kernels

    assert kernels.enable()
    layer = _cuda_layer(*shape, name)
    x = torch.randn(rows, shape[1], device="cuda", dtype=dtype)
    with torch.no_grad():
        assert backends.select_backend(layer, x) is dispatch.forward
        y = layer(x)
        ref = packed.reference_linear(layer, x)  # fp32 decode + fp32 matmul
        with backends.use_backend("reference"):
            y_ref_path = layer(x)
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    assert _rel(y, ref) < TOL[dtype]
    assert _rel(y, y_ref_path) < 2 * TOL[dtype]


@cuda_only
@pytest.mark.parametrize("name", list(EXTRA_SCHEMES))
@pytest.mark.parametrize("rows", [1, 5])
def test_other_formats(name, rows):
    from holdall import kernels

    assert kernels.enable()
    layer = _cuda_layer(72, 512, name)
    x = torch.randn(2, rows, 512, device="cuda", dtype=torch.bfloat16)[:1]  # [1, rows, 512]
    with torch.no_grad():
        assert backends.select_backend(layer, x) is dispatch.forward
        y = layer(x)
    assert y.shape == (1, rows, 72)
    assert _rel(y, packed.reference_linear(layer, x)) < TOL[torch.bfloat16]


@cuda_only
@pytest.mark.parametrize("name", ["int4-sym", "int4-asym", "int4-asym-dq", "int4-g32-bf16"])
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 264)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("pipelined", [False, True])
def test_gemv_split_k_sums_every_group_once(split_k, shape, name, pipelined):
    """The one-row int kernel split over the groups (float32 partials, ordered sum, bias added once), with and
    without the register prefetch and Triton's pipelining: splits of whole tiles, a partial last tile (264 =
    2 x 128 + 8 columns), more splits than tiles (72 x 264 has 3 groups), into a NaN-poisoned output."""
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    x = torch.randn(p.in_features, device="cuda", dtype=torch.bfloat16)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=torch.bfloat16)
    cfg = {"BLOCK_N": 8, "BLOCK_G": max(1, 32 // (p.group // 8)), "num_warps": 4, "SPLIT_K": split_k}
    if pipelined:
        cfg.update(STAGES=3, PREFETCH=True)
    triton_wq4.gemv(ops, p, x, layer.bias.detach(), out, cfg)
    assert _rel(out, packed.reference_linear(layer, x[None])[0]) < TOL[torch.bfloat16]


@cuda_only
@pytest.mark.parametrize("name,dtype", [("int4-sym", torch.bfloat16), ("int4-asym", torch.bfloat16),
                                        ("int4-asym-dq", torch.bfloat16), ("int4-g32-bf16", torch.bfloat16),
                                        ("int4-sym", torch.float16)], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tma,prmt", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("block_n,block_g,stages,per_sm", [(16, 8, 3, 0), (64, 2, 1, 0), (16, 8, 3, 1), (8, 4, 4, 2)])
def test_gemv_tma_kernel(block_n, block_g, stages, per_sm, tma, prmt, shape, name, dtype):
    """The round-5 one-row kernel (weight tiles by TMA, one PRMT per code), each switch on and off: a partial
    last row tile (72 rows), a partial last group tile (86 groups in tiles of 8; 4 groups in a tile of 8), one
    program per tile or persistent programs looping over the tiles (``PROGRAMS_PER_SM``), bias added, every
    element of a NaN-poisoned output written."""
    _check_gemv_tma(name, shape, dtype, {"BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": stages, "TMA": tma,
                                         "PRMT": prmt, "PROGRAMS_PER_SM": per_sm})


def _check_gemv_tma(name, shape, dtype, cfg):
    """Launch the TMA GEMV with ``cfg`` into a NaN-poisoned output and compare it with the plain-torch reference."""
    from holdall.kernels import triton_wq4

    if cfg.get("TMA", True) and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    triton_wq4.gemv(packed.operands(layer, p), p, x, layer.bias.detach(), out,
                    {"VARIANT": "tma", "num_warps": 4, **cfg})
    assert _rel(out, packed.reference_linear(layer, x[None])[0]) < TOL[dtype]


def _xvec_cases():
    """(name, dtype, shape, block_n, block_g, per_sm, xvec, even): every combination the launcher accepts (EVEN_G
    only where the row's groups fill whole BLOCK_G tiles: 32 int / 64 NF4 groups at 4096 inputs, 4 / 8 at 512)."""
    cases = []
    for name, dtype in [("int4-sym", torch.bfloat16), ("int4-asym", torch.bfloat16), ("nf4-dq", torch.bfloat16),
                        ("int4-sym", torch.float16)]:
        for shape in [(4096, 4096), (72, 512)]:
            for block_n, block_g, per_sm in [(16, 4, 0), (32, 8, 0), (16, 4, 1)]:
                if "nf4" in name:
                    block_g *= 2  # 64-code blocks
                n_groups = shape[1] // SCHEMES[name].group_size
                for xvec, even in [(True, False), (False, True), (True, True)]:
                    if not even or n_groups % block_g == 0:
                        cases.append((name, dtype, shape, block_n, block_g, per_sm, xvec, even))
    return cases


@cuda_only
@pytest.mark.parametrize("name,dtype,shape,block_n,block_g,per_sm,xvec,even", _xvec_cases(), ids=str)
def test_gemv_tma_kernel_vector_x_and_even_groups(name, dtype, shape, block_n, block_g, per_sm, xvec, even):
    """Round 7's instruction cuts, not defaults yet: a word's 8 activations as one 16-byte load split in
    registers (``XVEC``), no group masks when the groups come in whole tiles (``EVEN_G``)."""
    _check_gemv_tma(name, shape, dtype, {"BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": 3,
                                         "PROGRAMS_PER_SM": per_sm, "XVEC": xvec, "EVEN_G": even})


@cuda_only
def test_gemv_tma_even_groups_are_checked():
    from holdall.kernels import triton_wq4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    layer = _cuda_layer(72, 512, "int4-sym")  # 4 groups
    p = dispatch.layer_plan(layer)
    x = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(72, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="EVEN_G"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, out,
                        {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": 8, "EVEN_G": True})


def _rows_cases():
    """(name, dtype, shape, block_n, block_g, rpt, xq8): rows per thread 2 and 4 with and without int8
    activations (int codes only), at tilings the sweeps use; EVEN_N / EVEN_G wherever the shape allows."""
    cases = []
    for name, dtype in [("int4-sym", torch.bfloat16), ("int4-asym", torch.bfloat16), ("int4-asym-dq", torch.bfloat16),
                        ("nf4-dq", torch.bfloat16), ("int4-sym", torch.float16)]:
        for shape in [(4096, 4096), (4096, 11008), (72, 512)]:
            for block_n, block_g, rpt in [(16, 4, 2), (32, 8, 2), (16, 2, 4)]:
                if "nf4" in name:
                    block_g *= 2  # 64-code blocks
                for xq8 in ([False] if "nf4" in name else [False, True]):
                    cases.append((name, dtype, shape, block_n, block_g, rpt, xq8))
    return cases


@cuda_only
@pytest.mark.parametrize("name,dtype,shape,block_n,block_g,rpt,xq8", _rows_cases(), ids=str)
def test_gemv_tma_rows_per_thread_and_int8_activations(name, dtype, shape, block_n, block_g, rpt, xq8):
    """Round 8's options: each thread holds ``RPT`` rows of one word position (the activations it decodes
    serve them all), no row masks where the row tiles divide N (``EVEN_N``), and ``XQ8``: each word's 8
    activations rounded to int8 with a power-of-two scale and multiplied by the int codes with DP4A -- checked
    against the float32 reference on the same rounded activations (W4A8), into a NaN-poisoned output."""
    from holdall.kernels import triton_wq4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    cfg = {"VARIANT": "tma", "num_warps": 4, "BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": 3, "XVEC": True,
           "RPT": rpt, "XQ8": xq8, "EVEN_N": p.out_features % block_n == 0,
           "EVEN_G": (p.in_features // p.group) % block_g == 0}
    triton_wq4.gemv(packed.operands(layer, p), p, x, layer.bias.detach(), out, cfg)
    xr = packed.round_activations_s8(x.float()) if xq8 else x
    assert _rel(out, packed.reference_linear(layer, xr[None])[0]) < TOL[dtype]
    if xq8:  # really the rounded activations: farther from the float-activation result than from its own
        far = _rel(out, packed.reference_linear(layer, x[None])[0])
        assert far > 2 * _rel(out, packed.reference_linear(layer, xr[None])[0])


@cuda_only
@pytest.mark.parametrize("name", ["int4-sym", "int4-asym", "int4-asym-dq"])
@pytest.mark.parametrize("block_n", [16, 32])
def test_gemv_tma_hands_int8_words_to_the_next_gemv(name, block_n):
    """``int8_out``: a producer GEMV (with ``norm_out``) writes ``h`` as the int8 words ``XQ8`` would round it to,
    bit for bit (``packed.pack_s8_words``), and a consumer reading them (``x_scales``) gives exactly what it
    gives rounding ``h`` itself -- with the norm's ``1 / rms`` applied, as in the decode step."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    producer = _layer(4096, 4096, {**SCHEMES, **EXTRA_SCHEMES}[name], device="cuda", bias=False, seed=3)
    consumer = _cuda_layer(11008, 4096, name)
    cfg = {"VARIANT": "tma", "BLOCK_N": block_n, "BLOCK_G": 4, "STAGES": 3, "num_warps": 4, "RPT": 2, "XVEC": True,
           "XQ8": True, "EVEN_N": True, "EVEN_G": True}
    _check_int8_handoff(producer, consumer, cfg)


def _check_int8_handoff(producer, consumer, cfg):
    """The producer (``norm_out``, a residual) writes ``h`` as exactly ``pack_s8_words(quantize(h))`` and its
    scales; the consumer reading them (``x_scales``, with ``norm_in``) gives bit for bit what it gives rounding
    ``h`` itself. Returns the producer's operands and outputs for further checks."""
    from holdall.kernels import triton_wq4

    pp, pc = dispatch.layer_plan(producer), dispatch.layer_plan(consumer)
    n, k = pp.out_features, pp.in_features
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    y, h = torch.empty_like(residual), torch.empty_like(residual)
    squares = torch.empty(n // cfg["BLOCK_N"], device="cuda", dtype=torch.float32)
    words = torch.full((n // 4,), 7, device="cuda", dtype=torch.int32)
    scales = torch.full((n // 8,), float("nan"), device="cuda")
    triton_wq4.gemv(packed.operands(producer, pp), pp, x, residual, y, dict(cfg), norm_out=(weight, h, squares),
                    int8_out=(words, scales))
    q, want_scales = packed.quantize_activations_s8(h)
    assert torch.equal(words, packed.pack_s8_words(q)) and torch.equal(scales, want_scales)
    own = torch.empty(pc.out_features, device="cuda", dtype=torch.bfloat16)
    handed = torch.full_like(own, float("nan"))
    triton_wq4.gemv(packed.operands(consumer, pc), pc, h, None, own, dict(cfg), norm_in=(squares, 1e-5))
    triton_wq4.gemv(packed.operands(consumer, pc), pc, words, None, handed, dict(cfg), norm_in=(squares, 1e-5),
                    x_scales=scales)
    assert torch.equal(handed, own)
    return x, residual, y, h, weight, words, scales


@cuda_only
@pytest.mark.parametrize("name,dtype", [("int4-sym", torch.bfloat16), ("int4-asym", torch.bfloat16),
                                        ("nf4", torch.bfloat16), ("nf4-dq", torch.bfloat16),
                                        ("int4-sym", torch.float16)], ids=str)
@pytest.mark.parametrize("shape", [(22016, 4096), (144, 512)], ids=str)
@pytest.mark.parametrize("block_n,block_g,xq8,norm", [(32, 4, False, True), (16, 4, False, False),
                                                      (32, 4, True, True), (16, 8, True, False)])
def test_gemv_tma_writes_the_gated_activation(name, dtype, shape, block_n, block_g, xq8, norm):
    """``glu``: a stacked ``[gate; up]`` layer's GEMV writes ``silu(gate) * up`` (each gate row beside its up row
    in one TMA box, the activation in the epilogue) -- what torch's ``F.silu(gate) * up`` gives on the same
    kernel's two outputs (the SiLU's exp may differ in the last float32 bit, so at most one step of the output
    dtype, rarely), and the reference's within tolerance; with and without the norm's ``1 / rms``, int8
    activations, partial row tiles (72 gate rows in tiles of 16), into a NaN-poisoned output."""
    from holdall.kernels import triton_wq4
    import torch.nn.functional as F

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    if xq8 and "nf4" in name:
        pytest.skip("int8 activations take int codes")
    if "nf4" in name:
        block_g *= 2  # 64-code blocks
    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    half = p.out_features // 2
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    cfg = {"VARIANT": "tma", "num_warps": 4, "BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": 3, "XVEC": True,
           "RPT": 2, "XQ8": xq8, "EVEN_G": (p.in_features // p.group) % block_g == 0}
    squares = torch.rand(7, device="cuda") * p.in_features
    norm_in = (squares, 1e-5) if norm else None
    full = torch.empty(p.out_features, device="cuda", dtype=dtype)
    triton_wq4.gemv(ops, p, x, layer.bias.detach(), full, {**cfg, "EVEN_N": p.out_features % block_n == 0},
                    norm_in=norm_in)
    got = torch.full((half,), float("nan"), device="cuda", dtype=dtype)
    triton_wq4.gemv(ops, p, x, layer.bias.detach(), got, {**cfg, "EVEN_N": half % (block_n // 2) == 0},
                    norm_in=norm_in, glu=True)
    want = F.silu(full[:half]) * full[half:]
    step = torch.finfo(dtype).eps * want.float().abs().clamp_min(1e-3)
    assert bool(((got.float() - want.float()).abs() <= 2 * step).all())
    assert float((got == want).float().mean()) > 0.99
    xr = packed.round_activations_s8(x.float()) if xq8 else x
    bias = layer.bias.detach().float()
    ref = packed.reference_linear(layer, xr[None])[0].float() - bias
    if norm:
        ref = ref * torch.rsqrt(squares.sum() / p.in_features + 1e-5)
    ref = ref + bias
    ref = F.silu(ref[:half].to(dtype).float()) * ref[half:].to(dtype).float()
    assert _rel(got, ref) < 2 * TOL[dtype]


@cuda_only
def test_gemv_tma_gated_activation_is_checked():
    from holdall.kernels import triton_wq4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    layer = _cuda_layer(144, 512, "int4-sym")
    p = dispatch.layer_plan(layer)
    x = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    cfg = {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": 4}
    with pytest.raises(ValueError, match="glu writes"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, torch.empty(144, device="cuda"), dict(cfg), glu=True)
    with pytest.raises(ValueError, match="only VARIANTs 'tma' and 'gluon'"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, torch.empty(72, device="cuda"),
                        {"VARIANT": "pairs", "BLOCK_N": 8, "BLOCK_G": 4}, glu=True)
    with pytest.raises(ValueError, match="RPT 2"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, torch.empty(72, device="cuda"),
                        {**cfg, "RPT": 4}, glu=True)


@cuda_only
def test_gemv_tma_int8_activations_refuse_codebooks_and_uneven_rows():
    from holdall.kernels import triton_wq4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90) or newer")
    for name, cfg, match in [("nf4", {"XQ8": True}, "XQ8"), ("int4-sym", {"EVEN_N": True, "BLOCK_N": 16}, "EVEN_N"),
                             ("int4-sym", {"RPT": 3}, "RPT")]:
        layer = _cuda_layer(72, 512, name)
        p = dispatch.layer_plan(layer)
        x = torch.randn(512, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(72, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=match):
            triton_wq4.gemv(packed.operands(layer, p), p, x, None, out,
                            {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": 2, **cfg})


@cuda_only
@pytest.mark.parametrize("name,dtype", [("nf4", torch.bfloat16), ("nf4-dq", torch.bfloat16), ("fp4", torch.bfloat16),
                                        ("nf4-dq", torch.float16)], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("block_n,block_g,stages,per_sm,registers", [(16, 8, 3, 0, True), (32, 16, 3, 0, True),
                                                                      (8, 8, 4, 2, True), (16, 8, 1, 0, False)])
def test_gemv_tma_kernel_codebooks(block_n, block_g, stages, per_sm, registers, shape, name, dtype):
    """The TMA GEMV on NF4/FP4 codes (with and without double-quantized scales): values from the register
    table or the float32 table in memory, partial row and group tiles, persistent programs, bias added, a
    NaN-poisoned output."""
    cfg = {"BLOCK_N": block_n, "BLOCK_G": block_g, "STAGES": stages, "PROGRAMS_PER_SM": per_sm}
    _check_gemv_tma(name, shape, dtype, cfg if registers else {**cfg, "BOOK": 0})


@cuda_only
def test_gemv_tma_kernel_refuses_a_partial_group():
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(72, 264, "int4-sym")
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(p.out_features, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of the group"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, out, {"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": 1})


# (scheme, activation dtype): every int scheme in bf16, fp16 (the 1024 + q magic) once, on the asymmetric one
_PACKED_INT = [(n, torch.bfloat16) for n in ("int4-sym", "int4-asym", "int4-asym-dq", "int4-g32-bf16")]
_PACKED_INT.append(("int4-asym", torch.float16))
# the codebooks in bf16, fp16 table bits once, on NF4 + double quant
_PACKED_BOOK = [(n, torch.bfloat16) for n in ("nf4", "nf4-dq", "fp4")] + [("nf4-dq", torch.float16)]


@cuda_only
@pytest.mark.parametrize("name,dtype", _PACKED_INT, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 264)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("split_k,counted", [(1, False), (3, True), (4, False)])
def test_tensor_core_kernel_packed_decode(split_k, counted, rows, shape, name, dtype):
    """The weight-left tensor-core kernel with the two-codes-per-instruction PTX decode (``PACKED``), for one
    row (``VARIANT mma`` of the GEMV) and for 20, with split-K summed by a second launch or by the last program
    of each tile (``SEM``): a partial last group (264 = 2 x 128 + 8), more splits than groups, bias added
    once, every element of a NaN-poisoned output written. Launched twice: the tile counters go back to zero."""
    from holdall.kernels import triton_wq4

    _check_tensor_core_packed(name, shape, rows, dtype, split_k, counted, stages=3, launches=2)
    assert all(int(c.count_nonzero()) == 0 for c in triton_wq4._COUNTERS.values())


def _check_tensor_core_packed(name, shape, rows, dtype, split_k, counted, stages, launches=1):
    """Launch the tensor-core kernel with ``PACKED`` (one row: ``VARIANT mma``) into NaN-poisoned outputs and
    compare each result with the plain-torch reference."""
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    x = torch.randn(rows, p.in_features, device="cuda", dtype=dtype)
    ref = packed.reference_linear(layer, x)
    cfg = {"BLOCK_N": 64, "SPLIT_K": split_k, "num_warps": 4, "num_stages": stages, "STAGES": stages,
           "PREFETCH": False, "FOLD": False, "PACKED": True, "SEM": counted}
    for _ in range(launches):
        out = torch.full((rows, p.out_features), float("nan"), device="cuda", dtype=dtype)
        if rows == 1:
            triton_wq4.gemv(ops, p, x.reshape(-1), layer.bias.detach(), out.view(-1), {**cfg, "VARIANT": "mma"})
        else:
            triton_wq4.gemm(ops, p, x, layer.bias.detach(), out, {**cfg, "VARIANT": "v2", "BLOCK_M": 32})
        assert _rel(out, ref) < TOL[dtype]


@cuda_only
@pytest.mark.parametrize("name,dtype", _PACKED_BOOK, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 320)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("split_k,counted,stages", [(1, False, 1), (3, True, 3), (4, False, 1)])
def test_tensor_core_kernel_register_table(split_k, counted, stages, rows, shape, name, dtype):
    """Codebooks looked up in a register-held table (``PACKED`` with ``BOOK``: NF4 / FP4 values as PTX
    immediates, two codes per PRMT) in the tensor-core kernel, one row and 20, split-K summed either way, with
    and without Triton's pipelining (no table loads left for it to turn into copies); a NaN-poisoned output."""
    _check_tensor_core_packed(name, shape, rows, dtype, split_k, counted, stages)


_V3_FORMATS = [("int4-sym", torch.bfloat16), ("int4-asym", torch.bfloat16), ("nf4", torch.bfloat16),
               ("nf4-dq", torch.bfloat16), ("fp4", torch.bfloat16), ("int4-asym-dq", torch.bfloat16),
               ("int4-g32-bf16", torch.bfloat16), ("int4-ch-asym", torch.bfloat16), ("int4-g256-asym", torch.bfloat16),
               ("int4-asym", torch.float16),
               ("nf4-dq", torch.float16)]
# (rows per program, warps, split-K, split-K summed by the last program, stages, other switches)
_V3_CONFIGS = [(64, 4, 1, False, 3, {}), (128, 4, 3, True, 3, {}), (256, 8, 4, False, 1, {}),
               (128, 8, 2, True, 4, {"XREG": False}), (64, 4, 5, True, 3, {"PRMT": False, "BOOK": 0}),
               (128, 4, 2, True, 3, {"FOLD16": True})]


@cuda_only
@pytest.mark.parametrize("name,dtype", _V3_FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [2, 20, 64])
@pytest.mark.parametrize("config", _V3_CONFIGS, ids=lambda c: f"n{c[0]}w{c[1]}s{c[2]}{'sem' if c[3] else ''}"
                         f"st{c[4]}{''.join(c[5])}")
def test_gemm_v3_kernel(config, rows, shape, name, dtype):
    """The round-6 tensor-core kernel (words decoded in the MMA's fragment order, activations reordered to
    match): every 4-bit format, partial row tiles (72 rows), one to five splits summed by a second launch or
    by each tile's last program, the PTX decodes (float32, or scaled in 16-bit pairs: ``FOLD16``) and their
    plain-Triton fallbacks, gathered activations, bias added once; launched twice into NaN-poisoned outputs,
    and the tile counters left at zero."""
    from holdall.kernels import triton_wq4

    block_n, warps, split_k, counted, stages, extra = config
    layer = _cuda_layer(*shape, name)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    x = torch.randn(rows, p.in_features, device="cuda", dtype=dtype)
    ref = packed.reference_linear(layer, x)
    cfg = {"VARIANT": "v3", "BLOCK_N": block_n, "num_warps": warps, "SPLIT_K": split_k, "SEM": counted,
           "num_stages": stages, "STAGES": stages, **extra}
    for _ in range(2):
        out = torch.full((rows, p.out_features), float("nan"), device="cuda", dtype=dtype)
        triton_wq4.gemm(ops, p, x, layer.bias.detach(), out, cfg)
        assert _rel(out, ref) < TOL[dtype]
    assert all(int(c.count_nonzero()) == 0 for c in triton_wq4._COUNTERS.values())


@cuda_only
@pytest.mark.parametrize("variant,in_f,rows,block_m,match", [
    ("v3", 264, 4, 16, "multiple of the group"),  # a partial last group: v3 reads rows as whole groups
    ("v2", 512, 20, 16, "smaller than the 20 input rows"),  # a row tile smaller than the rows: rows left out
    ("v3", 512, 20, 16, "smaller than the 20 input rows"),
])
def test_tensor_core_kernels_refuse_what_they_cannot_compute(variant, in_f, rows, block_m, match):
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(72, in_f, "int4-sym")
    p = dispatch.layer_plan(layer)
    x = torch.randn(rows, p.in_features, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, p.out_features, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        triton_wq4.gemm(packed.operands(layer, p), p, x, None, out,
                        {"VARIANT": variant, "BLOCK_M": block_m, "BLOCK_N": 64, "SPLIT_K": 1})


@cuda_only
@pytest.mark.parametrize("variant", ["v2", "v1"])  # v1: the first round's kernels (pairs / 4d GEMV, v1 GEMM)
@pytest.mark.parametrize("name", ["nf4-dq", "int4-asym"])
@pytest.mark.parametrize("rows", [1, 2, 33])
@pytest.mark.parametrize("split_k", [1, 4])
def test_every_output_written(rows, split_k, name, variant):
    """Launch directly into a NaN-poisoned output with each kernel and config family: every element written."""
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(4096, 11008, name)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    x = torch.randn(rows, p.in_features, device="cuda", dtype=torch.float16)
    out = torch.full((rows, p.out_features), float("nan"), device="cuda", dtype=torch.float16)
    if rows == 1:
        cfg = {"BLOCK_N": 4 * split_k, "BLOCK_G": 2, "num_warps": 4}
        if variant == "v2":  # 1 or 4 rows per program, a tile of 32 or 256 words (partial last tile)
            cfg.update(VARIANT="v2", BLOCK_N=split_k, BLOCK_G=2 if split_k == 1 else 16)
        elif p.kind == 2:
            cfg.update(VARIANT="4d", LUT16=True)
        triton_wq4.gemv(ops, p, x.reshape(-1), layer.bias.detach(), out.view(-1), cfg)
    else:
        cfg = {"BLOCK_M": 16 if rows < 17 else 64, "BLOCK_N": 64, "SPLIT_K": split_k, "num_warps": 4,
               "num_stages": 3}
        if variant == "v2":
            cfg["VARIANT"] = "v2"
        triton_wq4.gemm(ops, p, x, layer.bias.detach(), out, cfg)
    assert _rel(out, packed.reference_linear(layer, x)) < TOL[torch.float16]


@cuda_only
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_odd_shapes(name, rows):
    """Rows not a multiple of any block (42), a partial last int group (264 = 2 groups + 8 codes), and codebook
    rows of an odd number of blocks (320 = 5 blocks of 64), through the dispatch's own configs."""
    from holdall import kernels

    assert kernels.enable()
    in_f = 320 if SCHEMES[name].is_codebook else 264
    layer = _cuda_layer(42, in_f, name)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
        with torch.no_grad():
            assert backends.select_backend(layer, x) is dispatch.forward
            y = layer(x)
        assert _rel(y, packed.reference_linear(layer, x)) < TOL[dtype]


@cuda_only
def test_dispatch_rules_on_cuda():
    from holdall import kernels

    assert kernels.enable()
    layer = _cuda_layer(40, 256, "int4-sym")
    ok = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    assert dispatch.supports(layer, ok)
    assert not dispatch.supports(layer, torch.randn(65, 256, device="cuda", dtype=torch.bfloat16))  # > 64 rows
    assert not dispatch.supports(layer, torch.randn(2, 256, device="cuda"))  # fp32 compute stays reference
    grad_x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert not dispatch.supports(layer, grad_x)  # training: the reference has the backward
    with torch.no_grad():
        assert dispatch.supports(layer, grad_x)
    # outside no_grad, a bias that requires grad still takes the kernel and gets its gradient
    assert layer.bias.requires_grad
    y = layer(ok[:2])
    y.float().sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full_like(layer.bias, 2.0))
    layer.bias.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x32 = torch.randn(3, 256, device="cuda")
        assert dispatch.supports(layer, x32)
        with torch.no_grad():
            y = layer(x32)
    assert y.dtype == torch.bfloat16
    assert _rel(y, packed.reference_linear(layer, x32.bfloat16())) < TOL[torch.bfloat16]
    # a layer whose format the kernels cannot read falls back
    int8 = _layer(16, 256, QuantScheme(bits=8), device="cuda")
    assert not dispatch.supports(int8, ok)


def _check_dispatch_goes_to(module, cases, monkeypatch, out_features=264):
    """Each ``(format, rows, HOLDALL_GLUON, calls expected)`` of ``cases`` through a layer's own forward (1024
    inputs): how often ``module.gemm`` was called, and the output against the reference either way."""
    from holdall import kernels

    assert kernels.enable()
    _gluon_ready()
    calls = []
    real = module.gemm
    monkeypatch.setattr(module, "gemm", lambda *a, **k: calls.append(a[4].shape) or real(*a, **k))
    for name, rows, gluon, expected in cases:
        monkeypatch.setenv("HOLDALL_GLUON", gluon)
        calls.clear()
        layer = _cuda_layer(out_features, 1024, name)
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        assert len(calls) == expected, (name, rows, gluon)
        assert _rel(y, packed.reference_linear(layer, x)) < TOL[torch.bfloat16]


@cuda_only
def test_a_few_rows_take_the_tensor_core_gemv(monkeypatch):
    """Round 12: 2..8 rows of a symmetric int4 layer of short rows go to the Gluon tensor-core GEMV on a Hopper
    (the Triton v3 GEMM with HOLDALL_GLUON=0, for 16 rows, and for asymmetric codes), same results either way."""
    from holdall.kernels import gluon_mma

    _check_dispatch_goes_to(gluon_mma, [("int4-sym", 4, "1", 1), ("int4-sym", 8, "1", 1), ("int4-sym", 4, "0", 0),
                                        ("int4-sym", 16, "1", 0), ("int4-asym", 4, "1", 0)], monkeypatch)


@cuda_only
def test_many_rows_take_the_wgmma_gemm(monkeypatch):
    """Rounds 15-16: 17..64 rows of an NF4 / FP4 layer and 17..32 / 48..64 of an int4 sym one go to the
    warpgroup-MMA GEMM on a Hopper through the layer's own forward (not with HOLDALL_GLUON=0, nor 16 rows (the
    tensor-core GEMV), 40 int4 rows or asymmetric codes: the Triton v3 GEMM), on a layer of 128 tiles from 33 int4
    rows (by TMA, zero-padded below 48 rows); same results either way."""
    from holdall.kernels import gluon_wgmma

    _check_dispatch_goes_to(gluon_wgmma, [("nf4", 64, "1", 1), ("nf4-dq", 33, "1", 1), ("fp4", 48, "1", 1),
                                          ("nf4", 64, "0", 0), ("nf4", 17, "1", 1), ("nf4", 16, "1", 0),
                                          ("int4-sym", 64, "1", 1), ("int4-sym", 24, "1", 1),
                                          ("int4-sym", 40, "1", 0), ("int4-asym", 64, "1", 0)], monkeypatch)
    _check_dispatch_goes_to(gluon_wgmma, [("int4-sym", 33, "1", 1), ("nf4", 40, "1", 1), ("nf4", 56, "1", 1)],
                            monkeypatch, out_features=8192)


@cuda_only
def test_the_wgmma_gemm_only_where_wgmma_exists(monkeypatch):
    """On a GPU that is not a Hopper (a Blackwell passes the Gluon kernels' "sm_90 or newer" but has no wgmma) the
    dispatch leaves 17..64 rows to the Triton v3 GEMM -- same results -- and a wgmma launch asked for by name
    refuses, naming the GPU and the fix."""
    from holdall.kernels import gluon_wgmma

    with monkeypatch.context() as patch:
        patch.setattr(gluon_wgmma, "hopper", lambda device: False)
        _check_dispatch_goes_to(gluon_wgmma, [("nf4", 64, "1", 0), ("int4-sym", 24, "1", 0)], patch)
    layer = _cuda_layer(264, 1024, "nf4")
    p = dispatch.layer_plan(layer)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(64, 264, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    with pytest.raises(RuntimeError, match="sm_90.*sm_100.*config=None"):
        gluon_wgmma.gemm(packed.operands(layer, p), p, x, None, out, {"WG": 1, "SPLIT_K": 4})


@pytest.mark.parametrize("capability,wgmma", [((9, 0), True), ((8, 0), False), ((10, 0), False), ((12, 0), False)])
def test_wgmma_needs_sm90(capability, wgmma, monkeypatch):
    """``gluon_wgmma.hopper``: wgmma is an sm_90 instruction; neither Ampere nor Blackwell has it."""
    from holdall.kernels import gluon_wgmma

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert gluon_wgmma.hopper(0) is wgmma


@cuda_only
def test_first_cuda_forward_registers_the_kernels():
    """In a fresh process nothing calls enable(): the first CUDA forward loads the plugin itself."""
    code = textwrap.dedent(
        """
        import sys, torch
        from holdall.core import backends
        from holdall.core.linear import QuantLinear
        from holdall.core.scheme import QuantScheme
        layer = QuantLinear.from_linear(torch.nn.Linear(256, 64), QuantScheme()).cuda()
        assert "holdall.kernels" not in sys.modules and "triton" not in sys.modules
        with torch.no_grad():
            layer(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
        print("triton-wq4" in backends.available_backends(), "triton" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


@cuda_only
@pytest.mark.parametrize("name", list(SCHEMES) + ["fp4", "int4-asym-dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes", [((4096, 4096), (12288, 4096)), ((256, 128), (40, 256))])
def test_fused_gemv_splits_the_norm_over_two_epilogues(name, dtype, shapes):
    # the decoder's fused step: y = residual + producer(a), then consumer(rms_norm(y) * w) from the producer's
    # weighted row and partial sums of squares (transformers' RMSNorm in float32 as the reference)
    (p_out, p_in), (c_out, c_in) = shapes
    producer = _layer(p_out, p_in, {**SCHEMES, **EXTRA_SCHEMES}[name], device="cuda", seed=1)
    consumer = _layer(c_out, c_in, {**SCHEMES, **EXTRA_SCHEMES}[name], device="cuda", seed=2)
    if not (dispatch.norm_fusable(producer, dtype) and dispatch.norm_fusable(consumer, dtype)):
        assert torch.cuda.get_device_capability() < (9, 0), "Hopper runs the TMA GEMV for whole groups"
        pytest.skip("the norm folds only into the TMA GEMV (Hopper)")
    gen = torch.Generator(device="cpu").manual_seed(7)
    a = torch.randn(p_in, generator=gen).to("cuda", dtype)
    residual = (torch.randn(p_out, generator=gen) * 4).to("cuda", dtype)
    weight = (torch.rand(p_out, generator=gen) + 0.5).to("cuda", dtype)
    eps = 1e-5
    y, h, squares, _ = dispatch.fused_gemv(producer, a, residual=residual, norm_out=weight)
    y_ref = packed.reference_linear(producer, a.float()[None])[0] + residual.float()  # the producer's bias too
    assert y.dtype == h.dtype == dtype and _rel(y, y_ref) < TOL[dtype]
    yf = y.float()  # the stored residual stream, as the consumer's norm sees it
    torch.testing.assert_close(h.float(), yf * weight.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(squares.sum(), yf.pow(2).sum(), rtol=1e-5, atol=0)
    got = dispatch.fused_gemv(consumer, h, norm_in=(squares, eps)).y
    normed = yf * torch.rsqrt(yf.pow(2).mean() + eps) * weight.float()
    assert got.shape == (c_out,) and _rel(got, packed.reference_linear(consumer, normed[None])[0]) < TOL[dtype]


@cuda_only
def test_fused_gemv_refuses_a_kernel_without_the_norm():
    from holdall.kernels import triton_wq4

    layer = _cuda_layer(40, 256, "int4-sym")
    p = dispatch.layer_plan(layer)
    x = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(40, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot fold in a norm"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, out, {"BLOCK_N": 8, "BLOCK_G": 1},
                        norm_in=(torch.ones(4, device="cuda"), 1e-5))


# --- the Gluon one-row GEMV (round 10) -------------------------------------------------------------------
def _plan(in_f: int, scheme: QuantScheme, out_f: int = 64):
    return packed.plan(_layer(out_f, in_f, scheme))


def test_gluon_gemv_takes_float_rows_of_symmetric_int_codes():
    """The one-row configuration picks the Gluon kernel only where it can run: int symmetric codes (group-wise
    or per-channel scales; float or int8 activations), rows of whole 4-word thread tiles and groups."""
    from holdall.kernels import gluon_wq4  # imports without Triton (the kernel itself is then absent)

    sym = _plan(256, SCHEMES["int4-sym"])
    assert gluon_wq4.why_not(sym) is None
    assert gluon_wq4.why_not(_plan(256, QuantScheme(granularity="channel"))) is None
    others = [_plan(256, {**SCHEMES, **EXTRA_SCHEMES}[name]) for name in ("int4-asym", "nf4", "int4-asym-dq")]
    for p in others:
        assert "symmetric int codes only" in gluon_wq4.why_not(p)
    assert "double-quantized" in gluon_wq4.why_not(_plan(256, QuantScheme(double_quant=True)))
    assert gluon_wq4.why_not(sym, int8_activations=True) is None
    assert "whole number" in gluon_wq4.why_not(_plan(576, QuantScheme()))  # SmolLM2: 4.5 groups of 128
    # Gluon's API moves between releases: the kernel runs only on the Triton it was tested with, or newer
    assert gluon_wq4.version_tuple("3.6.0") == (3, 6) >= gluon_wq4.MIN_TRITON
    assert gluon_wq4.version_tuple("3.10.1+git1a2b") == (3, 10) > gluon_wq4.MIN_TRITON
    assert gluon_wq4.version_tuple("3.5.0") < gluon_wq4.MIN_TRITON
    if not HAS_TRITON:
        return  # the configuration below lives beside the Triton kernels
    from holdall.kernels import triton_wq4

    assert triton_wq4.gemv_config(sym, 132, tma=True, gluon=True)["VARIANT"] == "gluon"
    assert triton_wq4.gemv_config(sym, 132, tma=True, gluon=False)["VARIANT"] == "tma"
    int8 = triton_wq4.gemv_config(sym, 132, tma=True, int8_activations=True, gluon=True)
    assert int8["VARIANT"] == "gluon" and int8["XQ8"]
    for p in others:
        assert triton_wq4.gemv_config(p, 132, tma=True, gluon=True)["VARIANT"] != "gluon"
    # round 14: codebooks take the tensor-core GEMV (float activations); asymmetric zeros and double-quantized int
    # scales (not timed on it) keep the TMA kernel
    for name, variant in [("nf4", "gluon_mma"), ("nf4-dq", "gluon_mma"), ("fp4", "gluon_mma"), ("int4-asym", "tma"),
                          ("int4-asym-dq", "tma")]:
        p = _plan(256, {**SCHEMES, **EXTRA_SCHEMES}[name])
        assert triton_wq4.gemv_config(p, 132, tma=True, gluon=True)["VARIANT"] == variant, name
        assert triton_wq4.gemv_config(p, 132, tma=True, gluon=False)["VARIANT"] == "tma", name
    dq = _plan(256, QuantScheme(double_quant=True))
    assert triton_wq4.gemv_config(dq, 132, tma=True, gluon=True)["VARIANT"] == "tma"
    nf4 = _plan(256, SCHEMES["nf4"])
    assert not triton_wq4.gemv_config(nf4, 132, tma=True, gluon=True)["PDL"]
    chained = triton_wq4.gemv_config(nf4, 132, tma=True, gluon=True, chained=True)
    assert chained["PDL"] == gluon_wq4.pdl_enabled() and chained["TILES"] == 1
    # int8 words from the epilogue: whole 8-row words per Gluon tile, 16-row two-sub-tile TMA tiles, tiles that
    # divide the rows; anything else is rounded in torch by fused_gemv
    wide = _plan(256, SCHEMES["int4-sym"], out_f=96)
    assert triton_wq4.writes_int8_words(wide, {"VARIANT": "gluon", "BLOCK_N": 8})
    assert not triton_wq4.writes_int8_words(wide, {"VARIANT": "gluon", "BLOCK_N": 4})  # half a word per tile
    assert not triton_wq4.writes_int8_words(wide, {"VARIANT": "gluon", "BLOCK_N": 64})  # 96 rows: a partial tile
    assert triton_wq4.writes_int8_words(wide, {"VARIANT": "tma", "BLOCK_N": 16, "RPT": 2})
    assert not triton_wq4.writes_int8_words(wide, {"VARIANT": "tma", "BLOCK_N": 16})  # one row per thread
    assert not triton_wq4.writes_int8_words(wide, {"VARIANT": "pairs", "BLOCK_N": 8})


def test_gluon_gemv_programmatic_launch_config(monkeypatch):
    """Programmatic dependent launch (round 11) is for GEMVs chained in a decode step (no kernel there writes
    weights): launched with it, they read the number of row tiles the H200 sweep chose before they wait (float:
    2 on long rows, 0 on short ones; int8 activations: 1). A general call launches plainly (the kernel before it
    may have written its weights), and ``HOLDALL_PDL=0`` switches it off (A/B runs)."""
    from holdall.kernels import gluon_wq4

    short, long_rows = _plan(4096, SCHEMES["int4-sym"], out_f=4096), _plan(11008, SCHEMES["int4-sym"], out_f=64)
    monkeypatch.delenv("HOLDALL_PDL", raising=False)
    assert gluon_wq4.pdl_enabled()
    configs = {(p.in_features, int8): gluon_wq4.gemv_config(p, int8, chained=True)
               for p in (short, long_rows) for int8 in (0, 1)}
    tiles = {key: (cfg["PDL"], cfg["PDL_TILES"]) for key, cfg in configs.items()}
    assert tiles == {(4096, False): (True, 0), (11008, False): (True, 2), (4096, True): (True, 1),
                     (11008, True): (True, 1)}
    plain = [gluon_wq4.gemv_config(p, int8) for p in (short, long_rows) for int8 in (False, True)]
    assert all(not cfg["PDL"] and cfg["PDL_TILES"] == 0 for cfg in plain)
    monkeypatch.setenv("HOLDALL_PDL", "0")
    assert not gluon_wq4.pdl_enabled() and not gluon_wq4.gemv_config(short, chained=True)["PDL"]


def _gluon_ready():
    from holdall.kernels import gluon_wq4

    if not gluon_wq4.available(torch.cuda.current_device()):
        pytest.skip("the Gluon GEMV runs on Triton >= 3.6 and Hopper (what it was tested on)")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["int4-sym", "int4-g32-bf16", "int4-ch-sym"])
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096), (72, 256), (40, 1152)], ids=str)
@pytest.mark.parametrize("block_n,wk", [(8, 4), (8, 2), (16, 2), (4, 1), (2, 8)])
def test_gluon_gemv_matches_reference(shape, name, block_n, wk, dtype):
    """Every tiling against the fp32 reference, into a NaN-poisoned output: rows that fill whole tiles of
    512 words, a masked last tile (11008 inputs = 2 x 512 + 352 words; 1152 = 144 words in a 256-word tile),
    a row shorter than one tile, row counts that leave a partial row tile (72 rows at 16, 40 at 16), group 32
    with bf16 scales, per-channel scales (``group_step`` 0), bias."""
    from holdall.kernels import triton_wq4

    _gluon_ready()
    scheme = {"int4-ch-sym": QuantScheme(granularity="channel")}.get(name) or {**SCHEMES, **EXTRA_SCHEMES}[name]
    layer = _layer(*shape, scheme, device="cuda", seed=sum(shape))
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    triton_wq4.gemv(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), out,
                    {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk})
    assert _rel(out, packed.reference_linear(layer, x[None])[0]) < TOL[dtype]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(22016, 4096), (144, 512), (40, 11008)], ids=str)
@pytest.mark.parametrize("block_n,wk", [(8, 2), (16, 4), (4, 1)])
def test_gluon_gemv_epilogues(shape, block_n, wk, dtype):
    """The decoder's epilogues on the Gluon kernel: ``norm_out`` (``h = y * w`` and per-tile sums of squares
    of the stored row, a residual folded into the bias), ``norm_in`` (the producer's partials -> ``1 / rms``),
    and ``glu`` (``silu(gate) * up`` of a stacked layer, rounded as torch rounds it, within one output step of
    ``F.silu`` on the same kernel's two rows), against the reference."""
    _gluon_ready()
    _check_epilogues(shape, dtype, {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk})


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(22016, 4096), (144, 512), (40, 11008)], ids=str)
@pytest.mark.parametrize("tiles,warps", [(2, 4), (1, 8), (4, 2)])
@pytest.mark.parametrize("name", ["int4-sym", "nf4-dq"])  # nf4-dq: the scale folded into the weights (round 14)
def test_tensor_core_gemv_epilogues(shape, tiles, warps, dtype, name):
    """The same epilogues on the tensor-core GEMV (round 12), with programmatic dependent launch."""
    _gluon_ready()
    _check_epilogues(shape, dtype, {"VARIANT": "gluon_mma", "BLOCK_N": 16 * tiles, "TILES": tiles, "WK": warps,
                                    "PDL": True}, name)


def _check_epilogues(shape, dtype, cfg, name="int4-sym"):
    import torch.nn.functional as F

    from holdall.kernels import triton_wq4

    block_n = cfg["BLOCK_N"]
    layer = _layer(*shape, SCHEMES[name], device="cuda", seed=3)
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    gen = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(p.in_features, generator=gen).to("cuda", dtype)
    residual = (torch.randn(p.out_features, generator=gen) * 4).to("cuda", dtype)
    weight = (torch.rand(p.out_features, generator=gen) + 0.5).to("cuda", dtype)
    tiles = -(-p.out_features // block_n)
    y = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    h, squares = torch.full_like(y, float("nan")), torch.full((tiles,), float("nan"), device="cuda")
    bias = residual + layer.bias.detach().to(dtype)
    triton_wq4.gemv(ops, p, x, bias, y, dict(cfg), norm_out=(weight, h, squares))
    ref = packed.reference_linear(layer, x[None])[0] + residual.float()
    assert _rel(y, ref) < TOL[dtype]
    assert torch.equal(h, (y.float() * weight.float()).to(dtype))
    torch.testing.assert_close(squares.sum(), y.float().pow(2).sum(), rtol=1e-5, atol=0)
    # norm_in: the consumer scales its dot products by 1 / rms of the producer's row
    sq_in = torch.rand(7, device="cuda") * p.in_features
    got = torch.full_like(y, float("nan"))
    triton_wq4.gemv(ops, p, x, layer.bias.detach().to(dtype), got, dict(cfg), norm_in=(sq_in, 1e-5))
    bias32 = layer.bias.detach().float()
    want = (ref - residual.float() - bias32) * torch.rsqrt(sq_in.sum() / p.in_features + 1e-5) + bias32
    assert _rel(got, want) < TOL[dtype]
    # glu: the stacked [gate; up] layer's activation, with the norm folded in too
    half = p.out_features // 2
    full = torch.empty_like(y)
    triton_wq4.gemv(ops, p, x, layer.bias.detach().to(dtype), full, dict(cfg), norm_in=(sq_in, 1e-5))
    act = torch.full((half,), float("nan"), device="cuda", dtype=dtype)
    triton_wq4.gemv(ops, p, x, layer.bias.detach().to(dtype), act, dict(cfg), norm_in=(sq_in, 1e-5), glu=True)
    silu = F.silu(full[:half]) * full[half:]
    step = torch.finfo(dtype).eps * silu.float().abs().clamp_min(1e-3)
    assert bool(((act.float() - silu.float()).abs() <= 2 * step).all())
    want_act = F.silu(want[:half].to(dtype).float()) * want[half:].to(dtype).float()
    assert _rel(act, want_act) < 2 * TOL[dtype]


@cuda_only
@pytest.mark.parametrize("block_n,wk,pre,l2", [(8, 2, 2, False), (8, 2, 0, True), (16, 2, 1, True), (8, 4, 2, False),
                                               (8, 4, 0, False), (4, 1, 2, True)])
def test_gluon_gemv_programmatic_launch_waits_for_its_input(block_n, wk, pre, l2):
    """With ``PDL`` each GEMV of a chain starts before the previous one ends and loads ``PDL_TILES`` row tiles'
    weights (``PDL_L2``: prefetches the rest into L2), then waits (``griddepcontrol``) before it reads its input
    or writes. A chain of six dependent 7B-shaped GEMVs through two ping-pong buffers (each layer overwrites
    the row the layer before it is still reading) gives bit for bit what the same chain gives launched plainly,
    eagerly and replayed from a CUDA graph (20 replays: a race shows as a changed output), and stays within the
    fp32 reference chain's tolerance."""
    from holdall.kernels import triton_wq4

    _gluon_ready()
    shapes = [(11008, 4096), (4096, 11008)] * 3
    layers = [_layer(o, i, SCHEMES["int4-sym"], device="cuda", bias=False, seed=20 + n)
              for n, (o, i) in enumerate(shapes)]
    plans = [dispatch.layer_plan(layer) for layer in layers]
    ops = [packed.operands(layer, p) for layer, p in zip(layers, plans)]
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    wide, narrow = torch.empty(11008, device="cuda", dtype=torch.bfloat16), torch.empty_like(x)

    def chain(pdl: bool) -> None:
        h = x
        for n, (o, p) in enumerate(zip(ops, plans)):
            out = wide if n % 2 == 0 else narrow
            triton_wq4.gemv(o, p, h, None, out, {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk, "PDL": pdl,
                                                 "PDL_TILES": pre, "PDL_L2": l2})
            h = out

    chain(False)
    plain = narrow.clone()
    ref = x.float()
    for layer in layers:
        ref = packed.reference_linear(layer, ref.to(torch.bfloat16)[None])[0]
    assert _rel(plain, ref) < 3 * TOL[torch.bfloat16]
    narrow.fill_(float("nan"))
    chain(True)
    assert torch.equal(narrow, plain)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        chain(True)
    for _ in range(20):
        narrow.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(narrow, plain)


def test_tensor_core_gemv_plans_and_defaults():
    """The tensor-core GEMV (round 12) applies a scale per 128-input chunk to symmetric int codes in whole chunks
    (groups of 128, 256, ... or one per row), and (round 13) folds each thread's scale into the weights for
    codebooks, groups of 32 / 64 and double-quantized scales; asymmetric zeros stay with the Triton kernels. It is
    the default only where it was measured faster: 2..8 rows whose rounds unroll (up to 11008 inputs), 2..16 for
    the folded formats, never one row of int sym codes (the float Gluon GEMV's)."""
    from holdall.kernels import gluon_mma

    def shaped(out_f, in_f, name="int4-sym"):  # a small layer's plan with a 7B layer's shape (same group layout)
        return dataclasses.replace(_plan(256, SCHEMES[name]), out_features=out_f, in_features=in_f)

    cfg = gluon_mma.gemm_config(shaped(4096, 4096), 4, 132)
    assert cfg["VARIANT"] == "gluon_mma" and cfg["WK"] == 8 and cfg["BLOCK_N"] == 16 * cfg["TILES"] == 16
    assert gluon_mma.gemm_config(shaped(11008, 4096), 2, 132)["WK"] == 4  # 688 tiles x 8 warps: too many
    assert gluon_mma.gemm_config(shaped(4096, 4096), 8, 132) is not None
    assert gluon_mma.gemm_config(shaped(4096, 4096), 9, 132) is None  # two column tiles: v3
    long_rows = gluon_mma.gemm_config(shaped(4096, 11008), 4, 132)  # 11 rounds per warp: loads 3 rounds ahead
    assert (long_rows["WK"], long_rows["AHEAD"], cfg["AHEAD"]) == (8, 3, 0)
    assert gluon_mma.gemm_config(shaped(4096, 14336), 4, 132) is None  # 14 rounds: v3
    assert gluon_mma.gemm_config(shaped(4096, 4096, "int4-asym"), 4, 132) is None
    if HAS_TRITON:
        from holdall.kernels import triton_wq4

        sym = _plan(256, SCHEMES["int4-sym"])
        assert triton_wq4.gemv_config(sym, 132, tma=True, gluon=True)["VARIANT"] == "gluon"

    assert gluon_mma.why_not(_plan(256, SCHEMES["int4-sym"])) is None
    assert gluon_mma.why_not(_plan(256, QuantScheme(granularity="channel"))) is None
    assert "whole number" in gluon_mma.why_not(_plan(576, QuantScheme(granularity="channel")))
    assert "asymmetric" in gluon_mma.why_not(_plan(256, SCHEMES["int4-asym"]))
    # codebooks and groups shorter than a chunk: the scale folded into the weights (round 13), no loads run ahead
    # (timed: NF4 at 11008 inputs 18.2 us unrolled, 18.6 with loads 3 rounds ahead)
    everything = {**SCHEMES, **EXTRA_SCHEMES}
    for name, fold in [("int4-sym", False), ("nf4", True), ("nf4-dq", True), ("fp4", True), ("int4-g32-bf16", True)]:
        p = _plan(256, everything[name])
        assert gluon_mma.why_not(p) is None and gluon_mma.folds(p) == fold, name
        cfg = gluon_mma.gemm_config(dataclasses.replace(p, out_features=11008, in_features=4096), 4, 132)
        if name == "int4-g32-bf16":  # groups of 32: correct (device tests), not timed: v3 stays the default
            assert cfg is None
            continue
        # 4 warps (688 tiles x 8 would pass 24 warps per SM), so 8 rounds each: int loads run 3 rounds ahead
        assert (cfg["WK"], cfg["AHEAD"]) == (4, 0 if fold else 3), name
        sixteen = gluon_mma.gemm_config(dataclasses.replace(p, out_features=4096), 16, 132)
        assert (sixteen is not None) == (p.kind == 2), name  # codebooks to 16 rows (timed), int codes to 8
        assert gluon_mma.gemm_config(dataclasses.replace(p, out_features=4096), 17, 132) is None
    # round 14: int groups of 64 and double-quantized int scales (timed) up to 8 rows, no loads run ahead
    g64 = _plan(256, QuantScheme(group_size=64))
    int_dq = _plan(256, QuantScheme(double_quant=True))
    assert gluon_mma.folds(g64) and not gluon_mma.folds(int_dq) and gluon_mma.why_not(int_dq) is None
    for p in (g64, int_dq):
        cfg = gluon_mma.gemm_config(dataclasses.replace(p, out_features=4096, in_features=11008), 4, 132)
        assert (cfg["VARIANT"], cfg["WK"], cfg["AHEAD"]) == ("gluon_mma", 8, 0)
        assert gluon_mma.gemm_config(dataclasses.replace(p, out_features=11008), 2, 132)["WK"] == 4
        assert gluon_mma.gemm_config(dataclasses.replace(p, out_features=4096), 16, 132) is None
    # one row: codebooks only, 8 warps on every shape (round 14); int codes keep the FMA / TMA GEMVs
    for name in ("nf4", "nf4-dq", "fp4"):
        p = _plan(256, everything[name])
        for out_f, in_f in ((11008, 4096), (4096, 11008), (22016, 4096)):
            cfg = gluon_mma.gemv_config(dataclasses.replace(p, out_features=out_f, in_features=in_f), 132)
            assert (cfg["WK"], cfg["AHEAD"], cfg["PDL"]) == (8, 0, False), name
        assert gluon_mma.gemv_config(dataclasses.replace(p, in_features=14336), 132) is None  # 14 rounds
    for p in (g64, int_dq, _plan(256, SCHEMES["int4-sym"])):
        assert gluon_mma.gemv_config(p, 132) is None


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["int4-sym", "int4-ch-sym"])
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096), (72, 256), (40, 1152)], ids=str)
@pytest.mark.parametrize("tiles,warps", [(2, 4), (1, 8), (4, 4), (4, 2), (1, 1), (1, 16)])
def test_tensor_core_gemv_matches_reference(shape, name, tiles, warps, dtype):
    """The tensor-core GEMV against the fp32 reference into a NaN-poisoned output: chunks that fill every warp's
    share and ones that leave the last round partial (11008 inputs = 86 chunks; 1152 = 9), rows that leave a
    partial 16-row tile (72, 40), per-channel scales, bias, bf16 and fp16."""
    from holdall.kernels import gluon_mma

    _gluon_ready()
    scheme = {"int4-ch-sym": QuantScheme(granularity="channel")}.get(name) or SCHEMES[name]
    layer = _layer(*shape, scheme, device="cuda", seed=sum(shape) + 7)
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    cfg = {"VARIANT": "gluon_mma", "BLOCK_N": 16 * tiles, "TILES": tiles, "WK": warps, "PDL": False}
    gluon_mma.gemv(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), out, cfg)
    assert _rel(out, packed.reference_linear(layer, x[None])[0]) < TOL[dtype]
    again = torch.full_like(out, float("nan"))  # launched with programmatic dependent launch: the same numbers
    gluon_mma.gemv(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), again, {**cfg, "PDL": True})
    assert torch.equal(again, out)
    for ahead in (1, 2, 3):  # loads issued 1-3 rounds ahead (the partial round too; PDL: before the wait)
        for pdl in (False, True):
            again.fill_(float("nan"))
            gluon_mma.gemv(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), again,
                           {**cfg, "PDL": pdl, "AHEAD": ahead, "UNROLL": True})
            assert torch.equal(again, out), (ahead, pdl)


@pytest.mark.parametrize("name", ["int4-sym", "nf4-dq"])
def test_tensor_core_launchers_pass_what_the_kernel_takes(name, monkeypatch):
    """Both launchers' arguments bind to the Gluon kernel's own signature (no GPU: the launch is recorded, not
    run), every constexpr without a default given -- one row with the norm epilogues, and 13 rows."""
    import inspect

    from holdall.kernels import gluon_mma

    kernel = getattr(gluon_mma, "_gemv_mma_kernel", None)
    if kernel is None:
        pytest.skip("needs Triton with Gluon (the kernel is defined only there)")
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    monkeypatch.setattr(gluon_mma, "_gemv_mma_kernel", Recorder())
    layer = _layer(72, 256, {**SCHEMES, **EXTRA_SCHEMES}[name])
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    cfg = {"VARIANT": "gluon_mma", "BLOCK_N": 16, "TILES": 1, "WK": 4}
    x = torch.randn(13, 256, dtype=torch.bfloat16)
    norm_out = (torch.ones(72, dtype=torch.bfloat16), torch.empty(72, dtype=torch.bfloat16), torch.empty(5))
    gluon_mma.gemv(ops, p, x[0].contiguous(), None, torch.empty(72, dtype=torch.bfloat16), cfg,
                   norm_in=(torch.ones(3), 1e-5), norm_out=norm_out)
    gluon_mma.gemm(ops, p, x, None, torch.empty(13, 72, dtype=torch.bfloat16), cfg)
    signature = inspect.signature(kernel.fn)
    for grid, args, kwargs in calls:
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k not in ("num_warps", "launch_pdl")})
        assert grid == (5,)  # 72 rows in 16-row tiles
        assert bound.arguments["s_ptr"] is ops.scale and bound.arguments["dmap_ptr"] is ops.dmap
        assert bound.arguments["BOOK"] == (1 if name == "nf4-dq" else 0)
        assert bound.arguments["FOLD"] == gluon_mma.folds(p)
    assert calls[0][2]["NORM_IN"] and calls[0][2]["NORM_OUT"] and calls[1][2]["NT"] == 2


@pytest.mark.parametrize("name", ["int4-sym", "nf4-dq"])
def test_wgmma_launchers_pass_what_the_kernels_take(name, monkeypatch):
    """The wgmma GEMM's two launches (activations through registers; reordered and brought in by TMA, as they are
    or zero-padded to the wgmma's rows) bind to their kernels' own signatures (no GPU: the launches are recorded,
    not run), with split-K's counters and partials and the layer's format constexprs."""
    import inspect

    from holdall.kernels import gluon_wgmma

    kernels = [getattr(gluon_wgmma, n, None) for n in ("_gemm_wgmma_kernel", "_gemm_wgmma_tma_kernel")]
    if None in kernels:
        pytest.skip("needs Triton with Gluon (the kernels are defined only there)")
    from holdall.kernels import triton_wq4

    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, grid, args, kwargs))

    for kernel in kernels:
        monkeypatch.setattr(gluon_wgmma, kernel.fn.__name__, Recorder(kernel))
    monkeypatch.setattr(triton_wq4, "_tile_counters", lambda device, tiles: torch.zeros(tiles, dtype=torch.int32))
    layer = _layer(200, 1152, {**SCHEMES, **EXTRA_SCHEMES}[name])
    p = dispatch.layer_plan(layer)
    ops = packed.operands(layer, p)
    x = torch.randn(40, 1152, dtype=torch.bfloat16)
    for xtma, pad in ((False, False), (True, False), (True, True)):
        gluon_wgmma.gemm(ops, p, x, None, torch.empty(40, 200, dtype=torch.bfloat16),
                         {"WG": 1, "SPLIT_K": 4, "XTMA": xtma, "AHEAD": 2, "PAD": pad})
    assert [c[0] for c in calls] == kernels + kernels[1:]
    # the TMA descriptors: the reordered activations as they are (40 rows), or zero-padded to the wgmma's 64
    plain, padded = (c[2][0].base for c in calls[1:])
    assert plain.shape == (40, 1152) and torch.equal(plain, gluon_wgmma.fragment_order(x))
    assert padded.shape == (64, 1152) and torch.equal(padded[:40], plain) and not padded[40:].any()
    for kernel, grid, args, kwargs in calls:
        bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k != "num_warps"})
        assert grid == (4, 3)  # 200 rows in 64-row tiles; 9 chunks in splits of 3
        assert bound.arguments["s_ptr"] is ops.scale and bound.arguments["dmap_ptr"] is ops.dmap
        assert bound.arguments["part_ptr"].shape == (3, 40, 200) and bound.arguments["sem_ptr"].numel() == 4
        assert (bound.arguments["MP"], bound.arguments["AHEAD"], bound.arguments["SPLIT_K"]) == (64, 2, 3)
        assert bound.arguments["BOOK"] == (1 if name == "nf4-dq" else 0)


def test_tensor_core_launch_options_are_checked():
    """Loads run ahead only in the unrolled rounds, 0-3 of them; tilings as the kernel's layouts allow."""
    from holdall.kernels import gluon_mma

    assert gluon_mma._launch_options({"TILES": 1, "WK": 8, "AHEAD": 3}, unroll=True) == (1, 8, False, True, 3)
    with pytest.raises(ValueError, match="needs UNROLL"):
        gluon_mma._launch_options({"TILES": 1, "WK": 8, "AHEAD": 2, "UNROLL": False}, unroll=True)
    with pytest.raises(ValueError, match="0-3"):
        gluon_mma._launch_options({"TILES": 1, "WK": 8, "AHEAD": 4}, unroll=True)
    with pytest.raises(ValueError, match="BLOCK_N 16 x TILES"):
        gluon_mma._launch_options({"TILES": 3, "WK": 8}, unroll=True)
    with pytest.raises(ValueError, match="WK 1, 2, 4, 8 or 16"):
        gluon_mma._launch_options({"TILES": 1, "WK": 32}, unroll=True)
    with pytest.raises(ValueError, match="WK 16 takes one 16-row tile"):
        gluon_mma._launch_options({"TILES": 2, "WK": 16, "BLOCK_N": 32}, unroll=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096), (72, 256)], ids=str)
@pytest.mark.parametrize("rows", [2, 5, 8, 13, 16, 17, 32, 64])
@pytest.mark.parametrize("tiles,warps", [(2, 4), (1, 8), (1, 16)])
def test_tensor_core_gemv_takes_up_to_64_rows(shape, rows, tiles, warps, dtype):
    """2..64 rows as the MMA's columns (lane ``g`` of column tile ``nt`` loads row ``8 nt + g``; 1, 2, 4 or 8
    column tiles; rounds unrolled or in a loop): each row against the fp32 reference, into a NaN-poisoned output
    with a row stride wider than the row; bias added."""
    from holdall.kernels import triton_wq4

    _gluon_ready()
    layer = _layer(*shape, SCHEMES["int4-sym"], device="cuda", seed=sum(shape) + rows)
    p = dispatch.layer_plan(layer)
    x = torch.randn(rows, p.in_features + 64, device="cuda", dtype=dtype)[:, :p.in_features]
    out = torch.full((rows, p.out_features + 8), float("nan"), device="cuda", dtype=dtype)[:, :p.out_features]
    cfg = {"VARIANT": "gluon_mma", "BLOCK_N": 16 * tiles, "TILES": tiles, "WK": warps, "PDL": True}
    if warps == 16 and rows > 32:  # 512 threads x the registers of 8 column tiles do not fit an SM
        with pytest.raises(ValueError, match="WK 16 takes up to 32 rows"):
            triton_wq4.gemm(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), out, cfg)
        return
    triton_wq4.gemm(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), out, cfg)
    want = packed.reference_linear(layer, x)
    for r in range(rows):
        assert _rel(out[r], want[r]) < TOL[dtype]
    if rows <= 8:  # one column tile, rounds unrolled: with the loads 3 rounds ahead, the same numbers
        again = torch.full_like(out, float("nan"))
        triton_wq4.gemm(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), again,
                        {**cfg, "AHEAD": 3, "UNROLL": True})
        assert torch.equal(again, out)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "int4-g32-bf16", "int4-sym-dq"])
@pytest.mark.parametrize("shape", [(4096, 11008), (72, 1152)], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 8, 13, 64])
def test_tensor_core_gemv_folds_the_scale_of_codebooks_and_short_groups(shape, name, rows, dtype):
    """NF4 / FP4 codebooks (register table) and int groups of 32 (each thread's 32 inputs with their own scale,
    multiplied into the decoded weights) and double-quantized scales, against the fp32 reference: one row
    through :func:`gemv` (every tiling's layout is the same decode), 2..64 rows through :func:`gemm`, into
    NaN-poisoned outputs with rows wider than the output; the partial last round (11008 inputs = 86 chunks,
    1152 = 9) and a partial 16-row tile (72); loads run ahead give the same numbers."""
    from holdall.kernels import gluon_mma

    _gluon_ready()
    scheme = {"int4-sym-dq": QuantScheme(double_quant=True)}.get(name) or {**SCHEMES, **EXTRA_SCHEMES}[name]
    layer = _layer(*shape, scheme, device="cuda", seed=sum(shape) + rows)
    p = dispatch.layer_plan(layer)
    assert gluon_mma.folds(p) == (name != "int4-sym-dq")
    ops, bias = packed.operands(layer, p), layer.bias.detach().to(dtype)
    x = torch.randn(rows, p.in_features + 64, device="cuda", dtype=dtype)[:, :p.in_features]
    want = packed.reference_linear(layer, x)
    cfg = {"VARIANT": "gluon_mma", "BLOCK_N": 16, "TILES": 1, "WK": 8, "PDL": True}
    if rows == 1:
        out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
        gluon_mma.gemv(ops, p, x[0].contiguous(), bias, out, cfg)
        assert _rel(out, want[0]) < TOL[dtype]
        return
    out = torch.full((rows, p.out_features + 8), float("nan"), device="cuda", dtype=dtype)[:, :p.out_features]
    gluon_mma.gemm(ops, p, x, bias, out, cfg)
    for r in range(rows):
        assert _rel(out[r], want[r]) < TOL[dtype], r
    if rows <= 8:
        again = torch.full_like(out, float("nan"))
        gluon_mma.gemm(ops, p, x, bias, again, {**cfg, "AHEAD": 3, "UNROLL": True})
        assert torch.equal(again, out)


@cuda_only
def test_gluon_gemv_refuses_what_it_cannot_compute():
    from holdall.kernels import triton_wq4

    _gluon_ready()
    layer = _cuda_layer(40, 256, "int4-asym")
    p = dispatch.layer_plan(layer)
    x = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(40, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="symmetric int codes only"):
        triton_wq4.gemv(packed.operands(layer, p), p, x, None, out, {"VARIANT": "gluon", "BLOCK_N": 8})
    sym = _cuda_layer(40, 256, "int4-sym")
    ps = dispatch.layer_plan(sym)
    with pytest.raises(ValueError, match="BLOCK_N"):
        triton_wq4.gemv(packed.operands(sym, ps), ps, x, None, out, {"VARIANT": "gluon", "BLOCK_N": 3})
    with pytest.raises(ValueError, match="int8 words as x need an XQ8 config"):
        triton_wq4.gemv(packed.operands(sym, ps), ps, x.view(torch.int32)[:64], None, out,
                        {"VARIANT": "gluon", "BLOCK_N": 8}, x_scales=torch.ones(32, device="cuda"))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096), (72, 256), (40, 1152)], ids=str)
@pytest.mark.parametrize("block_n,wk", [(8, 4), (16, 2), (4, 1)])
def test_gluon_gemv_int8_activations(shape, block_n, wk, dtype):
    """``XQ8`` on the Gluon kernel: each word's 8 activations rounded to int8 with a power-of-two scale
    (bit for bit :func:`holdall.kernels.packed.quantize_activations_s8`) and multiplied by the int codes with
    DP4A -- against the float32 reference on the same rounded activations, and farther from the
    float-activation result than from it; full, masked and partial tiles; NaN-poisoned output."""
    from holdall.kernels import triton_wq4

    _gluon_ready()
    layer = _layer(*shape, SCHEMES["int4-sym"], device="cuda", seed=sum(shape) + 1)
    p = dispatch.layer_plan(layer)
    x = torch.randn(p.in_features, device="cuda", dtype=dtype)
    out = torch.full((p.out_features,), float("nan"), device="cuda", dtype=dtype)
    triton_wq4.gemv(packed.operands(layer, p), p, x, layer.bias.detach().to(dtype), out,
                    {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk, "XQ8": True})
    xr = packed.round_activations_s8(x.float())
    near = _rel(out, packed.reference_linear(layer, xr[None])[0])
    assert near < TOL[dtype]
    assert _rel(out, packed.reference_linear(layer, x[None])[0]) > 2 * near


@cuda_only
@pytest.mark.parametrize("block_n,wk", [(8, 2), (16, 4)])
def test_gluon_gemv_hands_int8_words_to_the_next_gemv(block_n, wk):
    """``int8_out`` on the Gluon kernel: the producer (``norm_out``) writes ``h`` as exactly the int8 words and
    scales ``XQ8`` rounds it to, and a consumer reading them (``x_scales``, with the norm's ``1 / rms``, a
    masked last tile at 11008 inputs) gives exactly what it gives rounding ``h`` itself; the same words the TMA
    kernel hands over."""
    from holdall.kernels import triton_wq4

    _gluon_ready()
    producer = _layer(11008, 4096, SCHEMES["int4-sym"], device="cuda", bias=False, seed=3)
    consumer = _layer(4096, 11008, SCHEMES["int4-sym"], device="cuda", bias=False, seed=4)
    cfg = {"VARIANT": "gluon", "BLOCK_N": block_n, "WK": wk, "XQ8": True}
    x, residual, y, h, weight, words, scales = _check_int8_handoff(producer, consumer, cfg)
    pp = dispatch.layer_plan(producer)
    with pytest.raises(ValueError, match="multiple of 8"):
        triton_wq4.gemv(packed.operands(producer, pp), pp, x, residual, y, {**cfg, "BLOCK_N": 4},
                        norm_out=(weight, h, torch.empty(11008 // 4, device="cuda")), int8_out=(words, scales))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["int4-sym", "int4-ch-sym", "nf4", "nf4-dq", "fp4", "int4-g32-bf16", "int4-sym-dq"])
@pytest.mark.parametrize("shape", [(4096, 11008), (200, 1152)], ids=str)
@pytest.mark.parametrize("rows", [1, 13, 24, 33, 64])
@pytest.mark.parametrize("wg,split_k,xtma,ahead,pad", [(2, 1, False, 1, False), (1, 3, False, 3, False),
                                                        (2, 8, False, 2, False), (4, 8, False, 1, False),
                                                        (2, 1, True, 2, False), (1, 3, True, 3, False),
                                                        (4, 8, True, 1, False), (1, 3, True, 3, True)])
def test_wgmma_gemm_matches_reference(shape, name, rows, wg, split_k, xtma, ahead, pad, dtype):
    """The warpgroup-MMA GEMM (rounds 15-16) against the fp32 reference: every format it takes, 1..64 activation
    rows (the wgmma's N rounded up to a power of two: 8 / 16 / 32 / 64, rows past M zeros), 64 / 128 / 256 weight
    rows per program with a partial last tile (200 rows), split-K summed by the last program (11008 inputs = 86
    chunks: uneven splits), the activations staged through registers or reordered once and brought in by TMA
    (``XTMA``: a ring of 3 slots, wrapped at 86 / 29 / 11 chunks; ``PAD``: zero rows appended up to the wgmma's
    N), weights loaded 1-3 chunks ahead (splits of 1-3 chunks too), into NaN-poisoned outputs with rows wider than
    the output; launched twice (the split counters reset)."""
    from holdall.kernels import gluon_wgmma

    _gluon_ready()
    scheme = {"int4-sym-dq": QuantScheme(double_quant=True), "int4-ch-sym": QuantScheme(granularity="channel")}.get(
        name) or {**SCHEMES, **EXTRA_SCHEMES}[name]
    layer = _layer(*shape, scheme, device="cuda", seed=sum(shape) + rows)
    p = dispatch.layer_plan(layer)
    ops, bias = packed.operands(layer, p), layer.bias.detach().to(dtype)
    x = torch.randn(rows, p.in_features + 64, device="cuda", dtype=dtype)[:, :p.in_features]
    want = packed.reference_linear(layer, x)
    for _ in range(2):
        out = torch.full((rows, p.out_features + 8), float("nan"), device="cuda", dtype=dtype)[:, :p.out_features]
        gluon_wgmma.gemm(ops, p, x, bias, out, {"WG": wg, "SPLIT_K": split_k, "XTMA": xtma, "AHEAD": ahead,
                                               "PAD": pad})
        for r in range(rows):
            assert _rel(out[r], want[r]) < TOL[dtype], r


def test_wgmma_fragment_order_is_the_decode_order():
    """The TMA path's reordered activations (CPU: plain torch) put stored input ``32 c + 8 wd + 4 p + 2 e + hk``
    of each 128-input chunk at logical input ``32 wd + 16 p + 8 hk + 2 c + e`` -- the order in which
    :mod:`holdall.kernels.gluon_mma`'s decode hands a thread its codes (its docstring's ``phi``), so the dot
    product is unchanged: checked on the index itself and on a product against the unpermuted one."""
    from holdall.kernels.gluon_wgmma import fragment_order

    k = torch.arange(128)
    wd, p, hk, c, e = k // 32, (k // 16) % 2, (k // 8) % 2, (k // 2) % 4, k % 2
    phi = 32 * c + 8 * wd + 4 * p + 2 * e + hk
    x = torch.arange(384, dtype=torch.float64).reshape(1, 384)
    assert torch.equal(fragment_order(x)[0], torch.cat([phi, phi + 128, phi + 256]).double())
    w, xs = torch.randn(5, 256, dtype=torch.float64), torch.randn(3, 256, dtype=torch.float64)
    torch.testing.assert_close(fragment_order(xs) @ fragment_order(w).T, xs @ w.T)
    padded = fragment_order(xs, 8)
    assert padded.shape == (8, 256) and torch.equal(padded[:3], fragment_order(xs)) and not padded[3:].any()
    assert torch.equal(fragment_order(xs, 2), fragment_order(xs))


def test_wgmma_gemm_default_rule():
    """Rounds 15-16's default (:func:`holdall.kernels.gluon_wgmma.gemm_config`): 17..64 rows of codebooks and of
    int sym codes in whole chunks (17..32 rows up to 4096 inputs, 48+ rows below 128 tiles); 33+ rows on layers of
    128+ 64-row tiles by TMA with ~2.6 programs per SM (zero-padded below 48 rows), others through registers with
    4 splits (what was timed); short int groups, int double quant, fewer or more rows and layers it cannot take
    keep the other kernels; launch shapes are checked."""
    from holdall.kernels import gluon_wgmma

    nf4, fp4, sym = (_plan(4096, s) for s in (SCHEMES["nf4"], EXTRA_SCHEMES["fp4"], SCHEMES["int4-sym"]))
    registers = {"VARIANT": "gluon_wgmma", "WG": 1, "SPLIT_K": 4}
    for p in (nf4, fp4, sym, _plan(4096, QuantScheme(granularity="channel"))):
        taken = [m for m in range(1, 80) if gluon_wgmma.gemm_config(p, m, 132) == registers]
        # int codes keep v3 at 33..47 rows on layers below 128 tiles
        assert taken == (list(range(17, 65)) if p.kind == 2 else list(range(17, 33)) + list(range(48, 65)))
        long = dataclasses.replace(p, in_features=11008)  # 17..32 rows of 11008 inputs: int codes keep v3
        assert [gluon_wgmma.gemm_config(long, m, 132) for m in range(17, 33)] == 16 * [
            {**registers, "WG": 2, "SPLIT_K": 8} if p.kind == 2 else None]
    # 17..32 rows of tall layers: int codes 2 splits; codebooks two warpgroups, ~2.6 programs per SM
    for out_f, splits in ((11008, 4), (12288, 4), (22016, 2)):
        assert gluon_wgmma.gemm_config(dataclasses.replace(sym, out_features=out_f), 24, 132) == {
            **registers, "SPLIT_K": 2}
        for p in (nf4, _plan(4096, SCHEMES["nf4-dq"])):
            assert gluon_wgmma.gemm_config(dataclasses.replace(p, out_features=out_f), 32, 132) == {
                **registers, "WG": 2, "SPLIT_K": splits}
    for p in (nf4, sym):
        tall = {out_f: gluon_wgmma.gemm_config(dataclasses.replace(p, out_features=out_f), 64, 132)
                for out_f in (8192, 11008, 12288, 22016)}
        assert all(c["XTMA"] and c["AHEAD"] == 3 and c["WG"] == 1 and "PAD" not in c for c in tall.values())
        assert [c["SPLIT_K"] for c in tall.values()] == [3, 2, 2, 1]  # 128 / 172 / 192 / 344 tiles
        # TMA boxes more than 16 rows past the last row are slow: 33..47 rows are zero-padded to 64 first
        padded = [m for m in range(33, 65) if gluon_wgmma.gemm_config(dataclasses.replace(p, out_features=11008),
                                                                      m, 132).get("PAD")]
        assert padded == list(range(33, 48))
    assert gluon_wgmma.gemm_config(dataclasses.replace(nf4, out_features=8128), 64, 132)["SPLIT_K"] == 4  # 127
    for scheme in (SCHEMES["int4-asym"], QuantScheme(group_size=64), QuantScheme(double_quant=True)):
        assert gluon_wgmma.gemm_config(_plan(4096, scheme), 64, 132) is None
    assert gluon_wgmma.gemm_config(_plan(576, SCHEMES["nf4"]), 64, 132) is None  # 4.5 chunks of 128 inputs
    # (WG, MP, chunks per split, splits): no split left empty; rows rounded up to a power of two (>= 8)
    assert gluon_wgmma.launch_shape(nf4, 64, {"WG": 1, "SPLIT_K": 4}) == (1, 64, 8, 4)
    assert gluon_wgmma.launch_shape(dataclasses.replace(nf4, in_features=11008), 33, {"SPLIT_K": 4}) == (2, 64, 22, 4)
    assert gluon_wgmma.launch_shape(dataclasses.replace(nf4, in_features=384), 3, {"SPLIT_K": 8}) == (2, 8, 1, 3)
    with pytest.raises(ValueError, match="WG must be one of"):
        gluon_wgmma.launch_shape(nf4, 64, {"WG": 3})
