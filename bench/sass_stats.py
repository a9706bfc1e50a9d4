"""Compile a holdall 4-bit kernel for sm_90 on a machine without a GPU and count its loop's instructions.

    pip install --target /tmp/tri triton==3.6.0          # once; Triton's wheel carries ptxas and nvdisasm
    PYTHONPATH=src:/tmp/tri python bench/sass_stats.py gemm3 --set BLOCK_M=64 --set KIND=2 --set GROUP=64 \\
        --set SCALE_DQ=1 --set FOLD16=1
    PYTHONPATH=src:/tmp/tri python bench/sass_stats.py gemv_tma --set BLOCK_N=16 --set BLOCK_G=4
    PYTHONPATH=src:/tmp/tri python bench/sass_stats.py gemv_gluon --set K_WORDS=512 --set R=8 --set WK=2 --set XQ8=1

For the one-row TMA GEMV it also prints thread-instructions per 4-bit code (the loop's instructions x threads /
codes per iteration): 5.6 for the 4096-input default (round 7), which at the H200's issue rate caps the kernel
near 3 TB/s of codes before any memory stall.

Round 6 of the kernels (BENCHMARKS.md) was found this way: the SASS showed round 4's GEMM reading its weight bytes
one by one from shared memory and waiting for every wgmma. The pointer and integer arguments get the divisibility
hints Triton's JIT gives them at run time (16) except the few that are not multiples of 16, so the code is the
code the device runs. Prints registers, spills, shared memory and, per loop, the instruction count and the
commonest opcodes. Device-free: never a timing, only a place to look.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

#: argument types per kernel (bf16 activations, int4 codes); constexprs are the kernel's defaults plus --set
KERNELS = {
    "gemm3": ("_gemm3_kernel", {
        "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "sabs_ptr": "*fp32", "soff_ptr": "*fp32",
        "dmap_ptr": "*fp32", "val_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*fp32", "M": "i32", "N": "i32",
        "n_groups": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_wn": "i32", "scale_row_stride": "i32",
        "group_step": "i32", "zero_row_stride": "i32", "groups_per_split": "i32", "out_ptr": "*bf16",
        "sem_ptr": "*i32"}),
    "gemm2": ("_gemm2_kernel", {
        "x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "sabs_ptr": "*fp32", "soff_ptr": "*fp32",
        "dmap_ptr": "*fp32", "val_ptr": "*fp32", "val16_ptr": "*i16", "b_ptr": "*bf16", "y_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "n_groups": "i32", "stride_xm": "i32", "stride_ym": "i32",
        "stride_wn": "i32", "scale_row_stride": "i32", "group_step": "i32", "zero_row_stride": "i32",
        "groups_per_split": "i32", "out_ptr": "*bf16", "sem_ptr": "*i32"}),
}
KERNELS["gemv_tma"] = ("_gemv_tma_kernel", {
    "x_ptr": "*i32", "w_src": "tensordesc<i32[{BOX_N}, {BLOCK_G}, {GROUP_W}]>", "s_ptr": "*fp16", "z_ptr": "*u8",
    "sabs_ptr": "*fp32", "soff_ptr": "*fp32", "dmap_ptr": "*fp32", "val_ptr": "*fp32", "b_ptr": "*bf16",
    "y_ptr": "*bf16", "sq_in_ptr": "*fp32", "n_sq": "i32", "eps": "fp32", "nw_ptr": "*bf16", "h_ptr": "*bf16",
    "sq_out_ptr": "*fp32", "xs_ptr": "*fp32", "q_out_ptr": "*i32", "qs_out_ptr": "*fp32", "N": "i32", "n_half": "i32", "n_groups": "i32", "stride_wn": "i32", "scale_row_stride": "i32",
    "group_step": "i32", "zero_row_stride": "i32"})
KERNELS["gemv_gluon"] = ("_gemv_gluon_kernel", {
    "x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "sq_in_ptr": "*fp32",
    "n_sq": "i32", "eps": "fp32", "nw_ptr": "*bf16", "h_ptr": "*bf16", "sq_out_ptr": "*fp32", "xs_ptr": "*fp32",
    "q_out_ptr": "*i32", "qs_out_ptr": "*fp32", "N": "i32", "n_half": "i32", "stride_wn": "i32",
    "scale_row_stride": "i32", "group_step": "i32"})
#: what the launchers pass (constexprs without a default in the kernel): the GEMMs for 4096x11008 at g128, 4 rows,
#: split 8; the GEMV for int4 g128 sym with the 4096-input default tiling
BASE = {
    "gemm3": {"GROUP": 128, "KIND": 0, "SCALE_DQ": False, "HAS_BIAS": False, "SPLIT_K": 8, "BLOCK_M": 16,
              "BLOCK_N": 128, "X_BF16": True, "SEM": True},
    "gemv_tma": {"GROUP_W": 16, "KIND": 0, "SCALE_DQ": False, "HAS_BIAS": False, "BLOCK_N": 16, "BLOCK_G": 4,
                 "X_BF16": True, "group_step": 1},
}
BASE["gemm2"] = BASE["gemm3"]
#: the Gluon GEMV (round 10) for Llama-2-7B's down_proj: 11008 inputs, 8 rows x 4 warps; its rows are unrolled
#: (no loop), so the rate printed is the whole kernel's instructions per code
BASE["gemv_gluon"] = {"K_WORDS": 1376, "GROUP_W": 16, "R": 8, "WK": 4, "X_BF16": True, "HAS_BIAS": False,
                      "NORM_IN": False, "SQ_BLOCK": 512, "NORM_OUT": False, "GLU": False, "group_step": 1}
KERNELS["gemv_mma"] = ("_gemv_mma_kernel", {
    "x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "sabs_ptr": "*fp32", "soff_ptr": "*fp32", "dmap_ptr": "*fp32",
    "b_ptr": "*bf16", "y_ptr": "*bf16", "sq_in_ptr": "*fp32",
    "n_sq": "i32", "eps": "fp32", "nw_ptr": "*bf16", "h_ptr": "*bf16", "sq_out_ptr": "*fp32", "N": "i32",
    "n_half": "i32", "stride_wn": "i32", "scale_row_stride": "i32", "group_step": "i32", "M": "i32",
    "stride_x": "i32", "stride_y": "i32"})
#: the tensor-core GEMV (round 12) for Llama-2-7B's down_proj: 11008 inputs, 2 tiles x 4 warps
BASE["gemv_mma"] = {"K_WORDS": 1376, "GROUP_W": 16, "T": 2, "WK": 4, "X_BF16": True, "HAS_BIAS": False,
                    "NORM_IN": False, "SQ_BLOCK": 512, "NORM_OUT": False, "GLU": False, "group_step": 1, "NT": 0}
KERNELS["gemm_wgmma"] = ("_gemm_wgmma_kernel", {
    "x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "sabs_ptr": "*fp32", "soff_ptr": "*fp32", "dmap_ptr": "*fp32",
    "b_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "sem_ptr": "*i32", "N": "i32", "M": "i32",
    "stride_x": "i32", "stride_y": "i32", "stride_wn": "i32", "scale_row_stride": "i32", "group_step": "i32",
    "chunks_per_split": "i32"})
#: the wgmma GEMM (round 15) for Llama-2-7B's down_proj at 64 rows: 2 warpgroups, 8 splits
BASE["gemm_wgmma"] = {"K_WORDS": 1376, "GROUP_W": 16, "WG": 2, "MP": 64, "X_BF16": True, "HAS_BIAS": False,
                      "BOOK": 0, "SPLIT_K": 8, "group_step": 1}
KERNELS["gemm_wgmma_tma"] = ("_gemm_wgmma_tma_kernel", {
    "x_desc": "tensordesc<bf16[{MP}, 64],NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2, "
              "transposed=False, fp4_padded=False, cga_layout=[])>",
    "w_ptr": "*i32", "s_ptr": "*bf16", "sabs_ptr": "*fp32", "soff_ptr": "*fp32", "dmap_ptr": "*fp32",
    "b_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "sem_ptr": "*i32", "N": "i32", "M": "i32",
    "stride_y": "i32", "stride_wn": "i32", "scale_row_stride": "i32", "group_step": "i32", "chunks_per_split": "i32"})
BASE["gemm_wgmma_tma"] = {**BASE["gemm_wgmma"], "STAGES": 3}
NOT_MULTIPLE_OF_16 = {"x_desc", "chunks_per_split", "M", "n_groups", "groups_per_split", "scale_row_stride", "group_step", "zero_row_stride",
                      "N", "n_sq", "eps", "w_src"}
OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import inspect

    defaults = {k: v.default for k, v in inspect.signature(fn.fn).parameters.items()
                if v.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}  # ASTSource does not fill in the kernel's own defaults
    # an int argument equal to 1 is a constexpr at run time (Triton's JIT specializes it): group_step of
    # group-wise scales is, and the scale loads' contiguity depends on it
    signature = {k: v for k, v in signature.items() if k not in constexprs}
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if k not in NOT_MULTIPLE_OF_16}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # Gluon kernels: the same compiler, their own front end
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(kernel) -> tuple[str, str]:
    """(SASS text, resource usage line) from Triton's bundled nvdisasm / cuobjdump."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, usage


def loops(sass: str) -> dict[str, list[str]]:
    """Opcodes of every loop (a label and a backward branch to it)."""
    lines, labels, out = sass.splitlines(), {}, {}
    for i, line in enumerate(lines):
        if m := re.match(r"^(\.L_x_\d+):", line.strip()):
            labels[m.group(1)] = i
        if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i:
            out[m.group(1)] = [o.group(1) for x in lines[labels[m.group(1)]:i + 1] if (o := OP.match(x))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a constexpr (ints; 0/1 for switches), or num_warps / num_stages")
    parser.add_argument("--maxnreg", type=int, help="cap the registers a thread (the launch option ``maxnreg``)")
    parser.add_argument("--dump", type=Path, help="also write the kernel's TTGIR (its layouts) and SASS here")
    args = parser.parse_args()
    from holdall.kernels import gluon_mma, gluon_wgmma, gluon_wq4, triton_wq4

    name, signature = KERNELS[args.kernel]
    constexprs = dict(BASE[args.kernel])
    for item in args.set:
        key, value = item.split("=", 1)
        constexprs[key] = int(value)
    num_warps, num_stages = constexprs.pop("num_warps", 4), constexprs.pop("num_stages", 3)
    if constexprs.pop("DQ", 0):  # double-quantized scales: uint8 codes (not a constexpr: the pointer's type)
        signature = {**signature, "s_ptr": "*u8"}
    box = f"{constexprs.get('BLOCK_N')}"  # GLU: each gate row beside its up row, [BLOCK_N / 2, 2, ...]
    if constexprs.get("GLU") and "BLOCK_N" in constexprs:
        box = f"{constexprs['BLOCK_N'] // 2}, 2"
    signature = {k: v.format(**constexprs, BOX_N=box) for k, v in signature.items()}
    if args.kernel in ("gemv_gluon", "gemv_mma"):
        num_warps = constexprs["WK"]
    if args.kernel.startswith("gemm_wgmma"):
        num_warps = 4 * constexprs["WG"]
    module = {"gemv_gluon": gluon_wq4, "gemv_mma": gluon_mma, "gemm_wgmma": gluon_wgmma,
              "gemm_wgmma_tma": gluon_wgmma}.get(args.kernel, triton_wq4)
    kernel = compile_sm90(getattr(module, name), signature, constexprs, num_warps, num_stages, args.maxnreg)
    sass, usage = sass_of(kernel)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        (args.dump / f"{name}.ttgir").write_text(kernel.asm["ttgir"])
        (args.dump / f"{name}.sass").write_text(sass)
        (args.dump / f"{name}.ptx").write_text(kernel.asm["ptx"])
    regs = re.search(r"REG:(\d+)", usage)
    ops = [o.group(1) for x in sass.splitlines() if (o := OP.match(x))]
    spills = sum(o.startswith("STL") for o in ops)
    print(f"{name} {constexprs} warps {num_warps} stages {num_stages}: {regs.group(1) if regs else '?'} registers, "
          f"{spills} spill stores, {kernel.metadata.shared} B shared memory, {len(ops)} instructions")
    per_iteration = (constexprs["BLOCK_N"] * constexprs["BLOCK_G"] * constexprs["GROUP_W"] * 8
                     if args.kernel == "gemv_tma" else 0)  # 4-bit codes one loop iteration consumes
    if args.kernel in ("gemv_gluon", "gemv_mma"):
        rows = constexprs["R"] if args.kernel == "gemv_gluon" else 16 * constexprs["T"]
        codes = rows * constexprs["K_WORDS"] * 8  # one program's codes
        print(f"  whole kernel: {len(ops) * num_warps * 32 / codes:.2f} instructions per code; "
              f"{Counter(ops).most_common(16)}")
    for label, body in loops(sass).items():
        if len(body) > 1:
            rate = f" ({len(body) * num_warps * 32 / per_iteration:.2f} per code)" if per_iteration else ""
            print(f"  loop {label}: {len(body)} instructions{rate}; {Counter(body).most_common(16)}")


if __name__ == "__main__":
    main()
