"""Weight-only 4-bit matmul on one GPU: holdall's Triton kernels vs bf16 cuBLAS vs bitsandbytes NF4 (issue 6).

One command on the device machine (bitsandbytes from the carried wheel, if present):

    PYTHONPATH=src python3 bench/gpu_kernels.py --out $OUT/gpu_kernels.json [--sweep] [--batches 1,4]

For each weight shape ``[out, in]`` (4096x11008, 11008x4096, 4096x4096) and batch (1, 4, 16, 64 rows) it times
``F.linear`` on bf16 weights (cuBLAS), ``bnb.nn.Linear4bit`` NF4 (+ double quant), and holdall ``QuantLinear``
int4 g128 sym / asym, NF4 and NF4 + double quant through the normal dispatch (so the kernels the backend picks
by itself), plus holdall's reference path (dequantize + cuBLAS) at batch 1 and 64.

Timing (:func:`bench_graph`): each implementation's calls are captured in a CUDA graph over several copies of
the weight (enough that they never fit the 50 MiB L2, so every call streams its weight from HBM, as
consecutive layers do), replayed, and the median of 5 rounds of the mean per call is reported: GPU time
without Python launch overhead, as decoding with CUDA graphs runs. ``eager us`` is ``triton.testing.do_bench``
on one plain call (L2 flushed before each): it includes the CPU's launch cost whenever that exceeds the GPU
time. Reported: microseconds, achieved GB/s of weight bytes (codes + scales + zeros; bf16: 2 bytes per weight),
% of the card's measured device-to-device copy bandwidth (1 GiB copy, read + write bytes), and the speed-up
over bf16. ``--sweep`` also times a grid of block configurations per kernel (launched directly, same graph
harness) and records the best next to the built-in heuristic's choice: how the heuristics were tuned.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from holdall import kernels  # noqa: E402
from holdall.core import backends  # noqa: E402
from holdall.core.linear import QuantLinear  # noqa: E402
from holdall.core.scheme import QuantScheme  # noqa: E402
from holdall.kernels import dispatch, packed  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]  # [out, in]
BATCHES = [1, 4, 16, 64]
SCHEMES = {
    "int4-g128-sym": QuantScheme(),
    "int4-g128-asym": QuantScheme(symmetric=False),
    "nf4": QuantScheme(dtype="nf4", group_size=64),
    "nf4-dq": QuantScheme(dtype="nf4", group_size=64, double_quant=True),
}
#: formats only the focused sweeps time (``gemm_rows.py --schemes``, ``gluon_sweep.py --scheme``), not the table
MORE_SCHEMES = {
    "int4-g64-sym": QuantScheme(group_size=64),
    "int4-g128-sym-dq": QuantScheme(double_quant=True),
}


def bench(fn, rep: int = 100) -> float:
    """Eager: median microseconds per call (events, L2 flushed before each call). Includes what the CPU
    adds when launching is slower than the GPU work (Python dispatch, Triton's launcher)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")


L2_BYTES = 50 * 2**20  # H100 and H200 both have 50 MiB of L2


def copies_for(nbytes: int) -> int:
    """How many distinct weights to rotate through so that a call never finds its weight in L2."""
    return max(2, min(16, -(-3 * L2_BYTES // nbytes)))


def int4_copies(out_f: int, in_f: int, scheme: QuantScheme | None = None,
                ) -> tuple[list[QuantLinear], packed.Plan, list, int]:
    """One random ``[out_f, in_f]`` layer quantized with ``scheme`` (default int4 g128 sym; RTN) on the GPU, as
    enough copies for :func:`bench_graph`: ``(layers, plan, operands per copy, bytes per copy)``."""
    scheme = scheme or QuantScheme()
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data.normal_(0, 0.02)
    layers = [QuantLinear.from_linear(linear, scheme).cuda()]
    p = packed.plan(layers[0])
    nbytes = sum(t.numel() * t.element_size() for t in layers[0].buffers())
    layers += [QuantLinear.from_linear(linear, scheme).cuda() for _ in range(copies_for(nbytes) - 1)]
    return layers, p, [packed.operands(layer, p) for layer in layers], nbytes


def bf16_copies(out_f: int, in_f: int) -> list[torch.Tensor]:
    """A random bf16 ``[out_f, in_f]`` weight on the GPU, as enough copies for :func:`bench_graph`."""
    weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    return [weight] + [weight.clone() for _ in range(copies_for(weight.numel() * 2) - 1)]


def mma_tilings(spec: str) -> dict[str, dict]:
    """The tensor-core GEMV's launch configs named in ``spec``: ``TxW`` (16-row tiles per warp x warps along the
    row) gives two, its rounds unrolled (``mmaTxWu``) and in a loop (``mmaTxWl``); ``TxWaN`` one, unrolled with
    each round's loads issued ``N`` rounds ahead (``mmaTxWaN``, ``AHEAD``)."""
    configs = {}
    for tiling in filter(None, spec.split(",")):
        shape, _, ahead = tiling.partition("a")
        tiles, warps = (int(v) for v in shape.split("x"))
        base = {"VARIANT": "gluon_mma", "BLOCK_N": 16 * tiles, "TILES": tiles, "WK": warps}
        if ahead:
            configs[f"mma{tiling}"] = {**base, "UNROLL": True, "AHEAD": int(ahead)}
        else:
            configs[f"mma{tiling}u"] = {**base, "UNROLL": True}
            configs[f"mma{tiling}l"] = {**base, "UNROLL": False}
    return configs


def wgmma_tilings(spec: str) -> dict[str, dict]:
    """The wgmma GEMM's launch configs named in ``spec``: ``wgWsS`` (``W`` warpgroups of 64 weight rows per
    program, ``S`` splits of the row), then optionally ``tN`` (the activations reordered once and brought in by
    TMA through ``N`` slots, ``XTMA``; ``t`` alone: 3), ``aN`` (weights loaded ``N`` chunks ahead, ``AHEAD``) and ``p``
    (the TMA activations zero-padded to the tile's rows, ``PAD``)."""
    configs = {}
    for tiling in filter(None, spec.split(",")):
        match = re.fullmatch(r"wg(\d)s(\d+)(t(\d?))?(a(\d))?(p?)", tiling)
        if match is None:
            raise ValueError(f"wgmma config {tiling!r}: expected wgWsS[tN][aN][p], e.g. wg1s4, wg2s4t3a2, wg1s1ta3p")
        cfg = {"VARIANT": "gluon_wgmma", "WG": int(match[1]), "SPLIT_K": int(match[2])}
        if match[3]:
            cfg.update(XTMA=True, STAGES=int(match[4] or 3))
        if match[5]:
            cfg["AHEAD"] = int(match[6])
        if match[7]:
            cfg["PAD"] = True
        configs[tiling] = cfg
    return configs


def bench_graph(fns, replays: int = 20, rounds: int = 5) -> float:
    """GPU microseconds per call: ``fns`` (one per weight copy) captured once into a CUDA graph, replayed;
    median over ``rounds`` of the mean per call. No launch overhead (as decoding with graphs runs), and since
    consecutive calls read different weights, none is served from L2 (as consecutive layers are not)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and allocate outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (replays * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (us * 1e-6) / 1e9


def bnb_layer(weight: torch.Tensor, double_quant: bool):
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")
    return layer.to("cuda").eval()  # moving quantizes


def gemv_configs(group: int, codebook: bool) -> list[dict]:
    """Block configurations the sweep times for one row (the heuristic's own choice is timed beside them)."""
    group_w = group // 8
    if codebook:  # the [rows, groups, words, 8] kernel with the 16-value table; the round-2 kernel; round 4's
        # tensor-core kernel with the table in registers
        mma = {"VARIANT": "mma", "PREFETCH": False, "FOLD": False, "PACKED": True, "SEM": True, "num_warps": 4}
        return [{"BLOCK_N": 8, "BLOCK_G": 64 // group_w, "num_warps": 4, "STAGES": 1, "VARIANT": "4d", "LUT16": True},
                {"BLOCK_N": 4, "BLOCK_G": 512 // group_w, "num_warps": 4, "STAGES": 1, "VARIANT": "v2"},
                {**mma, "BLOCK_N": 64, "SPLIT_K": 8, "num_stages": 3, "STAGES": 3},
                {**mma, "BLOCK_N": 64, "SPLIT_K": 16, "num_stages": 3, "STAGES": 3},
                {**mma, "BLOCK_N": 128, "SPLIT_K": 8, "num_stages": 3, "STAGES": 3}] + [
                # round 5: the TMA kernel with the register table (bench/configs/gemv_tma_book_g64.json: the grid)
                {"VARIANT": "tma", "BLOCK_N": rows, "BLOCK_G": max(1, words // group_w), "STAGES": 3,
                 "num_warps": 4} for rows, words in ((16, 64), (16, 128), (32, 64))]
    # The round-1 pairs kernel's best configuration; round 5's TMA kernel (below); round 4's best one-row
    # configuration of the weight-left tensor-core kernel (VARIANT mma: the row padded to the MMA's 16 columns,
    # codes decoded two per PTX instruction, split-K summed by the last program of each tile).
    out = [{"BLOCK_N": 8, "BLOCK_G": max(1, 128 // group_w), "num_warps": 4, "STAGES": 3, "PREFETCH": True}]
    # Round 5: weight tiles by TMA and one PRMT per code (VARIANT tma), a grid of tilings, and each switch off
    # at one tiling to separate their effects
    for rows, words, stages, warps in ((8, 128, 3, 4), (16, 128, 3, 4), (16, 64, 4, 4), (32, 64, 3, 4),
                                       (16, 128, 3, 8), (32, 128, 3, 8), (8, 64, 4, 4), (64, 32, 4, 4),
                                       (16, 256, 2, 4), (32, 128, 4, 8)):
        out.append({"VARIANT": "tma", "BLOCK_N": rows, "BLOCK_G": max(1, words // group_w), "STAGES": stages,
                    "num_warps": warps, "TMA": True, "PRMT": True})
    for tma, prmt in ((True, False), (False, True), (False, False)):
        out.append({"VARIANT": "tma", "BLOCK_N": 16, "BLOCK_G": max(1, 128 // group_w), "STAGES": 3,
                    "num_warps": 4, "TMA": tma, "PRMT": prmt})
    mma = {"VARIANT": "mma", "num_stages": 3, "STAGES": 3, "PREFETCH": False}
    for rows, warps, split_k, sem, packed_decode in ((64, 4, 8, True, True),):  # round 4's best (full grid there)
        out.append({**mma, "BLOCK_N": rows, "num_warps": warps, "SPLIT_K": split_k, "SEM": sem,
                    "PACKED": packed_decode, "FOLD": not packed_decode})
    return out


def gemm_configs(rows: int, codebook: bool) -> list[dict]:
    """Block configurations the sweep times for 2..64 rows."""
    block_m = max(16, 1 << (rows - 1).bit_length())
    out = []  # round 1's v1 kernel (x as the left operand) is out of the sweep: 1.7-5x slower in round 2
    if codebook:  # (rows per program, warps, split-K, FOLD, split-K summed by the last program)
        v2 = [(128, 4, 8, False, False), (128, 4, 16, False, False), (128, 8, 16, False, False),
              (64, 4, 16, False, False), (64, 4, 16, True, False), (128, 8, 8, True, False),
              (128, 4, 8, False, True), (128, 4, 16, False, True), (64, 4, 16, False, True)]
        for block_n, warps, split_k, fold, sem in v2:
            out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": warps,
                        "num_stages": 1, "STAGES": 1, "PREFETCH": True, "FOLD": fold, "SEM": sem, "VARIANT": "v2"})
        # round 4: the table in registers (PACKED + BOOK), so Triton's pipelining is allowed again
        for block_n, warps, split_k, stages in ((64, 4, 8, 3), (64, 4, 16, 3), (128, 4, 8, 3), (128, 4, 16, 3),
                                                (64, 4, 8, 1), (128, 4, 8, 1)):
            out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": warps,
                        "num_stages": stages, "STAGES": stages, "PREFETCH": stages == 1, "FOLD": False,
                        "PACKED": True, "SEM": True, "VARIANT": "v2"})
    else:
        for block_n, warps, split_k in ((64, 4, 8), (128, 4, 4), (128, 4, 8)):
            out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": warps,
                        "num_stages": 3, "STAGES": 3, "PREFETCH": False, "FOLD": True, "VARIANT": "v2"})
        # round 4: the two-codes-per-instruction PTX decode (exact 128 + q, scale on the float32 partial) and
        # split-K summed by each tile's last program
        for block_n, warps, split_k in ((64, 4, 4), (64, 4, 8), (64, 4, 16), (128, 4, 4), (128, 4, 8), (128, 8, 8)):
            for packed_decode in (True, False):
                out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": warps,
                            "num_stages": 3, "STAGES": 3, "PREFETCH": False, "FOLD": not packed_decode,
                            "PACKED": packed_decode, "SEM": True, "VARIANT": "v2"})
    # round 6: the fragment-order kernel (the default for rows of whole groups; its full grids are
    # bench/configs/gemm_v3_grid*.json), splits around the heuristic's, scaled in 16-bit pairs or float32
    for block_n, split_k, fold16 in ((128, 2, True), (128, 4, True), (128, 8, True), (128, 16, True),
                                     (64, 8, True), (128, 8, False)):
        out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3,
                    "STAGES": 3, "SEM": True, "FOLD16": fold16, "VARIANT": "v3"})
    return out


def sweep(layers: list[QuantLinear], rows: int, configs: list[dict] | None = None) -> dict:
    """Graph-time every config of the kernel that serves ``rows`` (rotating over ``layers``, copies of one
    weight); return the best and the heuristic's choice."""
    from holdall.kernels import triton_wq4

    p = dispatch.layer_plan(layers[0])
    ops = [packed.operands(layer, p) for layer in layers]
    x = torch.randn(rows, p.in_features, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, p.out_features, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if rows <= dispatch.GEMV_MAX_ROWS:
        launch = lambda o, cfg: triton_wq4.gemv(o, p, x.reshape(-1), None, out.view(-1), cfg)  # noqa: E731
        tma = triton_wq4._has_tma(0) and ops[0].words.data_ptr() % 16 == 0  # what the dispatch decides
        configs, default = configs or gemv_configs(p.group, p.kind == 2), triton_wq4.gemv_config(p, sms, tma)
        if configs and all(c.get("XQ8") for c in configs):  # an int8-activation sweep: its own default beside
            default = triton_wq4.gemv_config(p, sms, tma, int8_activations=True)
    else:
        launch = lambda o, cfg: triton_wq4.gemm(o, p, x, None, out, cfg)  # noqa: E731
        configs, default = configs or gemm_configs(rows, p.kind == 2), triton_wq4.gemm_config(p, rows, sms)

    def timed(cfg, replays=10):
        return bench_graph([lambda o=o: launch(o, cfg) for o in ops], replays=replays, rounds=3)

    ref = packed.reference_linear(layers[0], x)
    # XQ8 configs multiply int8-rounded activations: checked against the reference on those (W4A8)
    ref_s8 = packed.reference_linear(layers[0], packed.round_activations_s8(x.float()))

    def checked(cfg):  # a config whose output is wrong is recorded as such, never as the fastest
        out.fill_(float("nan"))
        launch(ops[0], cfg)
        want = ref_s8 if cfg.get("XQ8") else ref
        err = float((out.float() - want).norm() / want.norm())
        if not err < 8e-3:
            raise ValueError(f"wrong output: rel err {err}")
        return err

    results = []
    for cfg in configs:
        try:
            err = checked(cfg)
            results.append((timed(cfg), {**cfg, "rel_err": err}))
        except Exception as exc:  # a config that does not compile/fit (shared memory) is skipped, not fatal
            results.append((float("inf"), {**cfg, "error": f"{type(exc).__name__}: {exc}"[:300]}))
    results.sort(key=lambda r: r[0])
    found = {"best_us": results[0][0], "best": results[0][1], "default_us": timed(default, 20),
             "default": default, "top5": [{"us": t, **c} for t, c in results[:5]],
             "all": [{"us": t, **c} for t, c in results]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu_kernels.json"))
    parser.add_argument("--sweep", action="store_true", help="also time a grid of block configs per kernel")
    parser.add_argument("--sweep-schemes", default="int4-g128-sym,nf4-dq")
    parser.add_argument("--sweep-configs", default=None,
                        help="a JSON file with the list of launch configurations to sweep (instead of the built-in)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sweep_configs = json.loads(Path(args.sweep_configs).read_text()) if args.sweep_configs else None

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    assert kernels.enable(), "this benchmark needs triton"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    info = {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
            "torch": torch.__version__, "triton": __import__("triton").__version__}
    try:
        import bitsandbytes as bnb

        info["bitsandbytes"] = bnb.__version__
    except Exception as exc:  # reported, and its rows skipped
        info["bitsandbytes"] = f"unavailable: {type(exc).__name__}: {exc}"
    info["copy_GBps"] = copy_bandwidth()
    print(json.dumps(info), flush=True)

    rows_out = []
    sweeps = []
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        linear = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(weight)
        one = {name: QuantLinear.from_linear(linear, scheme) for name, scheme in SCHEMES.items()}
        # Copies of each weight to rotate through (same bytes, distinct memory): see bench_graph.
        layers = {name: [layer] + [copy.deepcopy(layer) for _ in range(copies_for(layer.nbytes) - 1)]
                  for name, layer in one.items()}
        weights = [weight] + [weight.clone() for _ in range(copies_for(weight.numel() * 2) - 1)]
        bnb_layers = {}
        if not info["bitsandbytes"].startswith("unavailable"):
            for dq in (False, True):
                name = "bnb-nf4" + ("-dq" if dq else "")
                try:
                    bnb_layers[name] = [bnb_layer(weight, dq) for _ in range(len(layers[name[4:]]))]
                except Exception as exc:
                    info.setdefault("bnb_errors", []).append(f"{type(exc).__name__}: {exc}")
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
            entries = {}  # name -> (graph us, eager us, weight bytes, extra)
            with torch.no_grad():
                bf16_us = bench_graph([lambda w=w: F.linear(x, w) for w in weights])
                entries["bf16-cublas"] = (bf16_us, bench(lambda: F.linear(x, weight)), 2 * out_f * in_f, {})
                for name, copies in bnb_layers.items():
                    try:
                        entries[name] = (bench_graph([lambda m=m: m(x) for m in copies]), bench(lambda: copies[0](x)),
                                         one[name[4:]].nbytes, {})
                    except Exception as exc:
                        info.setdefault("bnb_errors", []).append(f"{name} b{batch}: {type(exc).__name__}: {exc}")
                for name, copies in layers.items():
                    layer = copies[0]
                    assert backends.select_backend(layer, x) is dispatch.forward
                    ref = packed.reference_linear(layer, x)
                    err = float((layer(x).float() - ref).norm() / ref.norm())
                    entries["holdall-" + name] = (bench_graph([lambda m=m: m(x) for m in copies]),
                                                  bench(lambda: layer(x)), layer.nbytes, {"rel_err": err})
                    if batch == 1 and dispatch.int8_ready(layer) is None:  # W4A8: XQ8, int8-rounded x
                        ref8 = packed.reference_linear(layer, packed.round_activations_s8(x.float()))
                        got8 = dispatch.project_int8(layer, x)
                        entries["holdall-" + name + "-int8act"] = (
                            bench_graph([lambda m=m: dispatch.project_int8(m, x) for m in copies]),
                            bench(lambda: dispatch.project_int8(layer, x)), layer.nbytes,
                            {"rel_err": float((got8.float() - ref8).norm() / ref8.norm()),
                             "rel_err_vs_float_x": float((got8.float() - ref).norm() / ref.norm())})
                    if batch in (1, 64):  # eager: its table lookups copy to the device, which graphs forbid
                        with backends.use_backend("reference"):
                            ref_us = bench(lambda: layer(x), rep=30)
                        entries["holdall-" + name + "-dequant+cublas"] = (ref_us, ref_us, layer.nbytes, {})
            for name, (us, eager_us, nbytes, extra) in entries.items():
                gbps = nbytes / (us * 1e-6) / 1e9
                rows_out.append({"shape": f"{out_f}x{in_f}", "batch": batch, "impl": name, "us": us,
                                 "eager_us": eager_us, "weight_bytes": nbytes, "GBps": gbps,
                                 "pct_copy_bw": 100 * gbps / info["copy_GBps"], "speedup_vs_bf16": bf16_us / us,
                                 **extra})
            line = "  ".join(f"{n.replace('holdall-', 'h-')}={us:.1f}us({bf16_us / us:.2f}x)"
                             for n, (us, *_) in entries.items() if "dequant" not in n)
            print(f"{out_f}x{in_f} b{batch}: {line}", flush=True)
            if args.sweep:
                for name in args.sweep_schemes.split(","):
                    s = sweep(layers[name], batch, sweep_configs)
                    sweeps.append({"shape": f"{out_f}x{in_f}", "batch": batch, "scheme": name, **s})
                    print(f"  sweep {name} b{batch}: best {s['best_us']:.2f}us {s['best']}  "
                          f"default {s['default_us']:.2f}us {s['default']}"
                          , flush=True)
                    for r in s["all"][:8]:
                        print(f"    {r}", flush=True)
        del layers, one, bnb_layers, weights, weight, linear
        torch.cuda.empty_cache()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows_out, "sweeps": sweeps}, indent=1))
    print_table(info, rows_out)


def print_table(info: dict, rows: list[dict]) -> None:
    print(f"\n{info['device']}  copy {info['copy_GBps']:.0f} GB/s  ({info['date']})")
    print(f"{'shape':>10} {'batch':>5} {'impl':<38} {'graph us':>8} {'eager us':>8} {'GB/s':>6} {'%copy':>5} "
          f"{'vs bf16':>7}")
    for r in rows:
        print(f"{r['shape']:>10} {r['batch']:>5} {r['impl']:<38} {r['us']:8.2f} {r['eager_us']:8.1f} {r['GBps']:6.0f} "
              f"{r['pct_copy_bw']:5.1f} {r['speedup_vs_bf16']:7.2f}")


if __name__ == "__main__":
    main()
