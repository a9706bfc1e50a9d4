"""llama.cpp's own imatrix pipeline on SmolLM2-135M: ``llama-imatrix`` then ``llama-quantize --imatrix``, scored
exactly like ``gguf_quality.py``'s rows, so its "llama.cpp + imatrix" column comes from llama.cpp's tools.

llama-cpp-python ships libllama but not the command-line tools; build them from its own source (the same
llama.cpp revision as the library the other rows use):

    pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>; tar xzf ...
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF && \\
        cmake --build build --target llama-imatrix llama-quantize

Usage:  python benchmarks/gguf_llama_imatrix.py --bin DIR/build/bin [--types Q4_K_M Q4_0 ...] [--chunks 20]
            [--calib-chunks 32] [--work out/gguf_quality_all]
The F16 file is ``WORK/smollm2-F16.gguf`` (``gguf_quality.py`` writes it; written here if missing). The
importance matrix is computed on the WikiText-2 *valid* split with ``--calib-chunks`` x 512 tokens (the amount
holdall's own imatrix uses in ``gguf_quality.py``); files are scored by llama.cpp on WikiText-2 *test* (ctx 512,
second half of each chunk), KLD and top-1 against the F16 file. Writes gguf_llama_imatrix.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", type=Path, required=True, help="folder holding llama-imatrix and llama-quantize")
    p.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0"])
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--calib-chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=REPO / "out" / "gguf_quality_all")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    tools = {name: args.bin / name for name in ("llama-imatrix", "llama-quantize")}
    for name, path in tools.items():
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: build {name} (see this script's docstring) or fix --bin")

    from holdall.data import wikitext2
    from holdall.evaluation.llamacpp import evaluate_gguf
    from holdall.evaluation.text import load_text

    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import cpu_name

    args.work.mkdir(parents=True, exist_ok=True)
    f16 = args.work / "smollm2-F16.gguf"
    if not f16.exists():
        import torch

        from holdall.formats.gguf.export import export_gguf
        from holdall.models import load_model

        model, tok = load_model("smollm2", dtype=torch.float32)
        export_gguf(model, f16, "F16", tokenizer=tok, progress=False)
    imatrix = args.work / "llama-imatrix.gguf"
    imatrix_s = run([str(tools["llama-imatrix"]), "-m", str(f16), "-f", str(wikitext2("valid")), "-c", "512",
                     "--chunks", str(args.calib_chunks), "-t", str(args.threads), "-o", str(imatrix)])
    log(f"llama-imatrix: {imatrix_s:.1f} s")
    test_text = load_text(wikitext2("test"))
    cache: dict = {}
    rows = []
    for file_type in args.types:
        out = args.work / f"llama-imatrix-{file_type}.gguf"
        seconds = run([str(tools["llama-quantize"]), "--imatrix", str(imatrix), str(f16), str(out), file_type,
                       str(args.threads)])
        r = evaluate_gguf(out, test_text, n_ctx=512, max_chunks=args.chunks, base_path=f16, threads=args.threads,
                          progress=False, base_cache=cache)
        row = {"type": file_type, "llama_quantize_s": round(seconds, 2),
               "llama.cpp+imatrix": {"ppl": round(r.ppl, 4), "kld": round(r.kld_mean, 5),
                                     "top1": round(r.top1_agreement, 4), "bytes": os.path.getsize(out),
                                     "base_ppl": round(r.base_ppl, 4)}}
        log(json.dumps(row))
        rows.append(row)
    report = {"machine": cpu_name(), "threads": args.threads, "chunks": args.chunks, "calib_chunks": args.calib_chunks,
              "imatrix_s": round(imatrix_s, 1), "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_llama_imatrix.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# llama.cpp's own imatrix pipeline (llama-imatrix + llama-quantize --imatrix) on SmolLM2-135M", "",
             f"Machine: {report['machine']}, {args.threads} thread(s), {report['date']}. imatrix: WikiText-2 valid, "
             f"{args.calib_chunks} x 512 tokens ({report['imatrix_s']} s). Scored on WikiText-2 test, ctx 512, first "
             f"{args.chunks} chunks; KLD / top-1 vs the F16 file.", "",
             "| type | bytes | PPL | KLD | top-1 |", "|---|---|---|---|---|"]
    for row in rows:
        r = row["llama.cpp+imatrix"]
        lines.append(f"| {row['type']} | {r['bytes']:,} | {r['ppl']} | {r['kld']} | {r['top1']} |")
    (args.out / "gguf_llama_imatrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
