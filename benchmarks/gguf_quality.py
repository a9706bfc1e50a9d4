"""GGUF quality on SmolLM2-135M: llama.cpp's own quantizer vs holdall's export, plain and calibrated.

For each file type: (1) llama.cpp's file — ``llama_model_quantize`` on holdall's F16 export (what llama-quantize
does); (2) holdall's export of the same type (``holdall export smollm2 --gguf TYPE``; its tensors are byte-equal to
(1), tests/test_gguf_export.py); (3) holdall's calibrated export (``--calibrate wikitext2``: an importance matrix
measured on the WikiText-2 *valid* split, 64 x 512 tokens, fed to the encoders' imatrix paths, which are
byte-equal to llama-quantize --imatrix for the same importances). Every file is scored by llama.cpp itself
(``holdall.evaluation.llamacpp``: llama-perplexity's protocol, ctx 512, second half of each chunk scored) on
WikiText-2 *test*: perplexity, KL divergence to the F16 file and top-1 agreement on the same positions.

Usage:  python benchmarks/gguf_quality.py [--types Q4_K_M Q4_0 ...] [--chunks 20] [--out benchmarks/results]
Writes gguf_quality.{json,md}; files go to out/gguf_quality (git-ignored).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def llama_quantize(src: Path, dst: Path, file_type: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = threads
    started = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {file_type}")
    return time.perf_counter() - started


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES))
    p.add_argument("--chunks", type=int, default=20, help="512-token chunks of WikiText-2 test scored")
    p.add_argument("--calib-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / "out" / "gguf_quality")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch

    from holdall.data import wikitext2
    from holdall.evaluation.llamacpp import evaluate_gguf
    from holdall.evaluation.text import load_text
    from holdall.formats.gguf.export import export_gguf
    from holdall.formats.gguf.imatrix import collect_imatrix
    from holdall.models import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import cpu_name

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2", dtype=torch.float32)
    f16 = export_gguf(model, args.work / "smollm2-F16.gguf", "F16", tokenizer=tok, progress=False)
    started = time.perf_counter()
    imatrix = collect_imatrix(model, tok, load_text(wikitext2("valid")), max_chunks=args.calib_chunks)
    imatrix_s = time.perf_counter() - started
    test_text = load_text(wikitext2("test"))

    def score(path: Path) -> dict:
        r = evaluate_gguf(path, test_text, n_ctx=512, max_chunks=args.chunks, base_path=f16,
                          threads=args.threads, progress=False)
        return {"ppl": round(r.ppl, 4), "kld": round(r.kld_mean, 5), "top1": round(r.top1_agreement, 4),
                "bytes": os.path.getsize(path), "base_ppl": round(r.base_ppl, 4)}

    rows = []
    for file_type in args.types:
        llama_path = args.work / f"llama-{file_type}.gguf"
        llama_s = llama_quantize(f16, llama_path, file_type, args.threads)
        started = time.perf_counter()
        plain = export_gguf(model, args.work / f"holdall-{file_type}.gguf", file_type, tokenizer=tok, progress=False)
        plain_s = time.perf_counter() - started
        calibrated = export_gguf(model, args.work / f"holdall-cal-{file_type}.gguf", file_type, tokenizer=tok,
                                 imatrix=imatrix, progress=False)
        row = {"type": file_type, "llama_quantize_s": round(llama_s, 2), "holdall_export_s": round(plain_s, 2),
               "llama.cpp": score(llama_path), "holdall": score(plain), "holdall+imatrix": score(calibrated)}
        row["kld_ratio_calibrated_vs_llama"] = round(row["holdall+imatrix"]["kld"] / row["llama.cpp"]["kld"], 4)
        log(json.dumps(row))
        rows.append(row)
    report = {"machine": cpu_name(), "threads": args.threads, "chunks": args.chunks, "imatrix_s": round(imatrix_s, 1),
              "calib_chunks": args.calib_chunks, "f16_ppl": rows[0]["llama.cpp"]["base_ppl"] if rows else None,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# GGUF quality on SmolLM2-135M: llama.cpp's quantizer vs holdall (plain and with holdall's imatrix)", "",
        f"Machine: {report['machine']}, {args.threads} threads. WikiText-2 test, llama-perplexity protocol (ctx 512, "
        f"second half scored), first {args.chunks} chunks; KLD and top-1 vs the F16 file (PPL {report['f16_ppl']}). "
        f"imatrix: WikiText-2 valid, {args.calib_chunks} x 512 tokens, {report['imatrix_s']} s.", "",
        "| type | file | bytes | PPL | KLD | top-1 |", "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key in ("llama.cpp", "holdall", "holdall+imatrix"):
            r = row[key]
            lines.append(f"| {row['type']} | {key} | {r['bytes']:,} | {r['ppl']} | {r['kld']} | {r['top1']} |")
    lines += ["", "KLD ratio holdall+imatrix / llama.cpp (no imatrix): " +
              ", ".join(f"{r['type']} {r['kld_ratio_calibrated_vs_llama']}" for r in rows)]
    (args.out / "gguf_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
