"""GGUF quality on SmolLM2-135M: llama.cpp's own quantizer vs holdall's export, plain and calibrated.

For each file type: (1) llama.cpp's file — ``llama_model_quantize`` on holdall's F16 export (what llama-quantize
does); (2) holdall's export of the same type (``holdall export smollm2 --gguf TYPE``; its tensors are byte-equal to
(1), tests/test_gguf_export.py); (3) holdall's calibrated export (``--calibrate wikitext2``: an importance matrix
measured on the WikiText-2 *valid* split, 64 x 512 tokens, fed to the encoders' imatrix paths, which are
byte-equal to llama-quantize --imatrix for the same importances); (4) holdall+gptq: the same calibration pass also
measures every linear's full input Hessian, and ``formats.gguf.refine`` chooses codes by error feedback (and
re-fits the scales) inside the same ggml types (``--calibrate wikitext2 --refine gptq``). Every file is scored by llama.cpp itself
(``holdall.evaluation.llamacpp``: llama-perplexity's protocol, ctx 512, second half of each chunk scored) on
WikiText-2 *test*: perplexity, KL divergence to the F16 file and top-1 agreement on the same positions.

Usage:  python benchmarks/gguf_quality.py [--types Q4_K_M Q4_0 ...] [--chunks 20] [--variants ...] [--out DIR]
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
VARIANTS = ("llama.cpp", "holdall", "holdall+imatrix", "holdall+gptq")


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


def same_tensors(a: Path, b: Path) -> bool:
    """Do two GGUF files hold the same tensors (names, ggml types, shapes, bytes)?"""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    if ta.keys() != tb.keys():
        return False
    return all(ta[n].tensor_type == tb[n].tensor_type and list(ta[n].shape) == list(tb[n].shape)
               and np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))
               for n in ta)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES))
    p.add_argument("--chunks", type=int, default=20, help="512-token chunks of WikiText-2 test scored")
    p.add_argument("--calib-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="which files to build and score (holdall's plain file is byte-equal to llama.cpp's)")
    p.add_argument("--work", type=Path, default=REPO / "out" / "gguf_quality")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="gguf_quality", help="stem of the result files")
    p.add_argument("--resume", action="store_true", help="keep the rows of types already measured in --work")
    args = p.parse_args(argv)

    import torch

    from holdall.data import wikitext2
    from holdall.evaluation.llamacpp import evaluate_gguf
    from holdall.evaluation.text import load_text
    from holdall.formats.gguf.export import export_gguf
    from holdall.formats.gguf.imatrix import collect_statistics
    from holdall.models import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import cpu_name

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2", dtype=torch.float32)
    f16 = export_gguf(model, args.work / "smollm2-F16.gguf", "F16", tokenizer=tok, progress=False)
    started = time.perf_counter()
    stats = collect_statistics(model, tok, load_text(wikitext2("valid")), max_chunks=args.calib_chunks,
                               hessians="holdall+gptq" in args.variants)
    imatrix = stats.imatrix
    imatrix_s = time.perf_counter() - started
    test_text = load_text(wikitext2("test"))

    base_cache: dict = {}  # the F16 file's log-probs, computed once for every file scored against it

    def score(path: Path) -> dict:
        r = evaluate_gguf(path, test_text, n_ctx=512, max_chunks=args.chunks, base_path=f16,
                          threads=args.threads, progress=False, base_cache=base_cache)
        return {"ppl": round(r.ppl, 4), "kld": round(r.kld_mean, 5), "top1": round(r.top1_agreement, 4),
                "bytes": os.path.getsize(path), "base_ppl": round(r.base_ppl, 4)}

    # Rows are appended to a JSON-lines file as each type finishes, so a long run that is stopped keeps what it
    # measured; --resume skips the types already there (same work dir, same settings).
    rows_path = args.work / "rows.jsonl"
    done = {}
    if args.resume and rows_path.exists():
        done = {r["type"]: r for r in map(json.loads, rows_path.read_text().splitlines()) if r.get("type")}
    elif rows_path.exists():
        rows_path.unlink()
    rows = []
    for file_type in args.types:
        if file_type in done:
            rows.append(done[file_type])
            continue
        row = {"type": file_type}
        if "llama.cpp" in args.variants:
            llama_path = args.work / f"llama-{file_type}.gguf"
            row["llama_quantize_s"] = round(llama_quantize(f16, llama_path, file_type, args.threads), 2)
            row["llama.cpp"] = score(llama_path)
        if "holdall" in args.variants:
            started = time.perf_counter()
            plain = export_gguf(model, args.work / f"holdall-{file_type}.gguf", file_type, tokenizer=tok, progress=False)
            row["holdall_export_s"] = round(time.perf_counter() - started, 2)
            if "llama.cpp" in row and same_tensors(plain, llama_path):
                # byte-identical tensors score identically: say so instead of scoring the same bytes again
                row["holdall"] = {**row["llama.cpp"], "bytes": os.path.getsize(plain), "tensors_identical_to_llama.cpp": True}
            else:
                row["holdall"] = score(plain)
        if "holdall+imatrix" in args.variants:
            calibrated = export_gguf(model, args.work / f"holdall-cal-{file_type}.gguf", file_type, tokenizer=tok,
                                     imatrix=imatrix, progress=False)
            row["holdall+imatrix"] = score(calibrated)
        if "holdall+gptq" in args.variants:
            started = time.perf_counter()
            refined = export_gguf(model, args.work / f"holdall-gptq-{file_type}.gguf", file_type, tokenizer=tok,
                                  imatrix=imatrix, refine="gptq", hessians=stats.hessians, progress=False)
            row["holdall_gptq_export_s"] = round(time.perf_counter() - started, 2)
            row["holdall+gptq"] = score(refined)
        for key, base in (("kld_ratio_calibrated_vs_llama", "llama.cpp"), ("kld_ratio_gptq_vs_imatrix", "holdall+imatrix")):
            top = "holdall+imatrix" if key.startswith("kld_ratio_calibrated") else "holdall+gptq"
            if top in row and base in row:
                row[key] = round(row[top]["kld"] / row[base]["kld"], 4)
        log(json.dumps(row))
        with open(rows_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
    report = {"machine": cpu_name(), "threads": args.threads, "chunks": args.chunks, "imatrix_s": round(imatrix_s, 1),
              "calib_chunks": args.calib_chunks, "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "f16_ppl": next((r[v]["base_ppl"] for r in rows for v in VARIANTS if v in r), None),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# GGUF quality on SmolLM2-135M: llama.cpp's quantizer vs holdall (plain, imatrix, imatrix + GPTQ refine)", "",
        f"Machine: {report['machine']}, {args.threads} threads, {report['date']}. WikiText-2 test, llama-perplexity protocol (ctx 512, "
        f"second half scored), first {args.chunks} chunks; KLD and top-1 vs the F16 file (PPL {report['f16_ppl']}). "
        f"imatrix: WikiText-2 valid, {args.calib_chunks} x 512 tokens, {report['imatrix_s']} s.", "",
        "| type | file | bytes | PPL | KLD | top-1 |", "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key in (v for v in VARIANTS if v in row):
            r = row[key]
            lines.append(f"| {row['type']} | {key} | {r['bytes']:,} | {r['ppl']} | {r['kld']} | {r['top1']} |")
    for key, label in (("kld_ratio_calibrated_vs_llama", "holdall+imatrix / llama.cpp (no imatrix)"),
                       ("kld_ratio_gptq_vs_imatrix", "holdall+gptq / holdall+imatrix (= llama.cpp + the same imatrix)")):
        if any(key in r for r in rows):
            lines += ["", f"KLD ratio {label}: " + ", ".join(f"{r['type']} {r[key]}" for r in rows if key in r)]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
