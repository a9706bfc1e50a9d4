"""Where the one-row int4 kernel's time goes: the same tiling with stages of the work left out (issue 6).

The default GEMV (``triton_wq4._gemv_kernel``: 8 weight rows x 128 int32 words per program and iteration,
Triton's 3-stage pipelining) streams weights at ~1.2-1.3 TB/s on an H200 whatever its grid (split-K) or
instruction count per code (round 3 in BENCHMARKS.md). Following the device notes' advice (time variants that
leave one stage out and take differences), this script times, on one ``[out, in/8]`` int32 word matrix with that
tiling, graph-captured and rotating over copies so nothing is served from L2:

* ``words``: load the words and fold them into an integer (XOR): the weight stream alone;
* ``words+x``: also load the activations as the kernel does (four strided int32 pairs per word), sum them;
* ``words+x+decode``: also decode every nibble (shift, mask, OR into a float, subtract) and multiply-add it with
  the activations — the kernel's arithmetic without scales;
* the real kernel (``QuantLinear`` int4 g128 sym through the normal dispatch) on the same shape, for reference;

each over a small grid of rows per program, words per iteration, pipelining depth and warps, and prints GB/s of
weight bytes against the card's copy bandwidth. Usage (on the device)::

    PYTHONPATH=src python3 bench/gemv_stream_probe.py [--shapes 4096x11008,11008x4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_kernels import bench_graph, copies_for, copy_bandwidth  # noqa: E402

from holdall.core.linear import QuantLinear  # noqa: E402
from holdall.core.scheme import QuantScheme  # noqa: E402

MODES = {"words": 0, "words+x": 1, "words+x+decode": 2}


@triton.jit
def _probe_kernel(w_ptr, x_ptr, y_ptr, N, KW, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                  STAGES: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn[:, None] < N
    rw = tl.arange(0, BLOCK_W)[None, :]
    bits = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    for k0 in tl.range(0, KW, BLOCK_W, num_stages=STAGES):
        kw = k0 + rw
        k_ok = kw < KW
        w = tl.load(w_ptr + rn[:, None] * KW + kw, mask=n_ok & k_ok, other=0)  # [BN, BW] int32
        if MODE <= 1:
            bits ^= w
        if MODE >= 1:
            for j in tl.static_range(4):
                pair = tl.load(x_ptr + kw * 4 + j, mask=k_ok, other=0)  # [1, BW]: x[8w + 2j], x[8w + 2j + 1]
                x_even = (pair << 16).to(tl.float32, bitcast=True)
                x_odd = (pair & -65536).to(tl.float32, bitcast=True)
                if MODE == 1:
                    acc += x_even + x_odd
                else:
                    q_even = (((w >> (8 * j + 4)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    q_odd = (((w >> (8 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    acc += q_even * x_even + q_odd * x_odd
    y = tl.sum(acc, axis=1) + tl.xor_sum(bits, axis=1).to(tl.float32)  # every loaded value reaches the output
    tl.store(y_ptr + rn, y, mask=rn < N)


def probe(words: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, mode: int, cfg: dict) -> float:
    n, kw = words[0].shape
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)

    def launch(w):
        _probe_kernel[grid](w, x, y, n, kw, MODE=mode, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"],
                            STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])

    return bench_graph([lambda w=w: launch(w) for w in words], replays=10, rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x11008,11008x4096")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this probe needs a CUDA GPU"
    copy_gbps = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(0), "copy_GBps": copy_gbps, "rows": []}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    grid = [dict(zip(("BLOCK_N", "BLOCK_W", "STAGES", "num_warps"), c))
            for c in itertools.product((8, 16, 32), (128, 256), (1, 3), (4, 8))]
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        kw = in_f // 8
        nbytes = out_f * kw * 4
        words = [torch.randint(-2**31, 2**31 - 1, (out_f, kw), dtype=torch.int32, device="cuda")
                 for _ in range(copies_for(nbytes))]
        x = torch.randn(in_f, device="cuda", dtype=torch.bfloat16).view(torch.int32)
        y = torch.empty(out_f, device="cuda", dtype=torch.float32)
        linear = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        layers = [QuantLinear.from_linear(linear, QuantScheme()) for _ in range(copies_for(nbytes))]
        xb = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            real_us = bench_graph([lambda m=m: m(xb) for m in layers], replays=10, rounds=3)
        real = {"shape": shape, "mode": "real kernel (codes + scales)", "us": real_us,
                "GBps": layers[0].nbytes / (real_us * 1e-6) / 1e9}
        result["rows"].append(real)
        print(f"{shape} real kernel: {real_us:.2f} us {real['GBps']:.0f} GB/s "
              f"({100 * real['GBps'] / copy_gbps:.0f}% of copy)", flush=True)
        for name, mode in MODES.items():
            rows = []
            for cfg in grid:
                try:
                    us = probe(words, x, y, mode, cfg)
                except Exception as exc:  # a configuration that does not fit is recorded, not fatal
                    rows.append({"shape": shape, "mode": name, **cfg, "error": f"{type(exc).__name__}"[:100]})
                    continue
                rows.append({"shape": shape, "mode": name, **cfg, "us": us, "GBps": nbytes / (us * 1e-6) / 1e9})
            result["rows"] += rows
            timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            default = next(r for r in rows if r["BLOCK_N"] == 8 and r["BLOCK_W"] == 128 and r["STAGES"] == 3
                           and r["num_warps"] == 4)
            best = timed[0]
            print(f"{shape} {name:>15}: kernel's tiling {default.get('us', float('nan')):.2f} us "
                  f"{default.get('GBps', 0):.0f} GB/s | best {best['us']:.2f} us {best['GBps']:.0f} GB/s "
                  f"({100 * best['GBps'] / copy_gbps:.0f}% of copy) at {best['BLOCK_N']} rows x {best['BLOCK_W']} "
                  f"words, {best['STAGES']} stages, {best['num_warps']} warps", flush=True)
        del words, layers
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
