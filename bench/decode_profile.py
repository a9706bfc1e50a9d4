"""Where a static-cache decode step spends its time: every kernel of the captured CUDA graph, summed by name.

One command on the device machine:

    PYTHONPATH=src python3 bench/decode_profile.py --out $OUT/decode_profile.json [--layers 8] [--schemes bf16,int4-g128-sym]

Builds ``bench/gpu_decode.py``'s Llama-2-7B-shape model (fewer layers: the per-layer mix is what matters), runs
:class:`holdall.serving.static_decode.StaticDecoder`'s captured step under ``torch.profiler`` and reports, per
kernel name, the device time per step and per layer; the step's wall time (graph replay, synchronized) beside the
sum of its kernels says how much is launch gaps between kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_decode import SCHEMES, build_model, log, no_pdl, triton_gemv  # noqa: E402

from holdall.serving.static_decode import StaticDecoder  # noqa: E402


def profile_steps(decoder: StaticDecoder, position: int, steps: int) -> tuple[dict[str, float], float]:
    """Kernel µs per step by name, and the step's synchronized wall time in µs (graph replays back to back)."""
    from torch.profiler import ProfilerActivity, profile

    token = torch.zeros((), dtype=torch.long, device=decoder.device)
    for _ in range(3):
        decoder.step(token, position)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step(token, position)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) / steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(token, position)
        torch.cuda.synchronize()
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name] += event.device_time / steps
    return dict(by_name), wall_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=272)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--schemes", default="bf16,int4-g128-sym")
    parser.add_argument("--variants", default="default",
                        help="for 4-bit int schemes, also: int8 (int8_activations=True), int8-no-handoff (each GEMV "
                             "rounds its own input), silu-separate (SiLU x up in its own launch, as before round 9), "
                             "triton / int8-triton (round 9's Triton GEMVs instead of the Gluon ones: "
                             "HOLDALL_GLUON=0), nopdl / int8-nopdl (without programmatic dependent launch: "
                             "HOLDALL_PDL=0), e.g. default,nopdl,triton,int8,int8-nopdl")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(args.layers, device)
    prompt = torch.randint(0, 32000, (16,), generator=torch.Generator().manual_seed(0)).to(device)
    report = {"device": torch.cuda.get_device_name(device), "layers": args.layers, "max_len": args.max_len,
              "rows": []}
    from holdall.algorithms import QuantConfig, quantize

    for label in [s for s in args.schemes.split(",") if s]:
        if label != "bf16":
            spec = dict(SCHEMES[label])
            quantize(model, QuantConfig.for_method(spec.pop("method"), **spec), progress=False)
        variants = [v for v in args.variants.split(",") if v] if label.startswith("int") else ["default"]
        for variant in variants:
            switch = (triton_gemv() if variant.endswith("triton") else no_pdl() if variant.endswith("nopdl")
                      else None)
            with switch or contextlib.nullcontext():
                decoder = StaticDecoder(model, max_len=args.max_len, int8_activations=variant.startswith("int8"))
                decoder._int8_handoff = variant != "int8-no-handoff"
                decoder._glu = variant != "silu-separate"
                decoder.prefill(prompt)
                kernels, wall_us = profile_steps(decoder, prompt.numel(), args.steps)
            total = sum(kernels.values())
            table = sorted(kernels.items(), key=lambda kv: -kv[1])
            row = {"weights": label, "variant": variant, "wall_us_per_step": round(wall_us, 1),
                   "kernel_us_per_step": round(total, 1), "gap_us_per_step": round(wall_us - total, 1),
                   "kernels": [{"name": n[:120], "us_per_step": round(t, 2),
                                "us_per_layer": round(t / args.layers, 2)} for n, t in table]}
            report["rows"].append(row)
            log(f"{label} {variant}: wall {wall_us:.1f} us/step, kernels {total:.1f}, gaps {wall_us - total:.1f}")
            for item in row["kernels"][:25]:
                log(f"  {item['us_per_step']:9.2f} us/step {item['us_per_layer']:8.2f} us/layer  {item['name']}")
            del decoder
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
