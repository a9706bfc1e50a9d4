"""GGUF export of SmolLM2-135M: holdall's ``export_gguf`` per file type vs llama.cpp's ``llama_model_quantize``.

The model is SmolLM2-135M-Instruct dequantized from the packaged Q4_1 GGUF (the only weights available offline).
holdall first writes an F16 GGUF; llama.cpp quantizes that file (what ``llama-quantize`` does), holdall exports
straight from the in-memory model. For each file type this records both wall times, the file sizes, and how many
tensors have the same type and the same bytes in both files (with holdall's non-calibrated encoders: all).

Usage:  python benchmarks/gguf_export_speed.py [--types Q4_K_M Q8_0 ...] [--out benchmarks/results]
Writes gguf_export_speed.json and gguf_export_speed.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp

from holdall.formats.gguf.export import export_gguf
from holdall.formats.gguf.filetypes import FILE_TYPES
from holdall.models import load_model
from machine_info import cpu_name  # benchmarks/ is on sys.path when a benchmark runs as a script


@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):  # module-level: ctypes callbacks must outlive every call into llama.cpp
    pass


def llama_quantize(src: Path, dst: Path, ftype: int, nthread: int) -> float:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, nthread
    start = time.perf_counter()
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return time.perf_counter() - start


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in reader.tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=[n for n, ft in FILE_TYPES.items() if ft.is_quantized])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))

    model, tok = load_model("smollm2")
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    start = time.perf_counter()
    f16 = export_gguf(model, work / "f16.gguf", "F16", tokenizer=tok, progress=False)
    f16_mib = round(f16.stat().st_size / 2**20, 1)
    rows = [{"type": "F16", "holdall_s": round(time.perf_counter() - start, 2), "size_mib": f16_mib}]
    for name in args.types:
        ft = FILE_TYPES[name]
        start = time.perf_counter()
        ours = export_gguf(model, work / f"{name}.gguf", name, tokenizer=tok, progress=False)
        holdall_s = time.perf_counter() - start
        llama_1 = llama_quantize(f16, work / f"{name}-llama.gguf", ft.ftype, 1)
        llama_n = llama_quantize(f16, work / f"{name}-llama.gguf", ft.ftype, os.cpu_count() or 1)
        a, b = tensors(ours), tensors(work / f"{name}-llama.gguf")
        rows.append({
            "type": name, "holdall_s": round(holdall_s, 2), "llama_1thread_s": round(llama_1, 2),
            f"llama_{os.cpu_count()}threads_s": round(llama_n, 2), "size_mib": round(ours.stat().st_size / 2**20, 1),
            "same_type": sum(a[n][0] == b[n][0] for n in b), "same_bytes": sum(a[n] == b[n] for n in b),
            "tensors": len(b),
        })
        print(rows[-1], flush=True)
        for path in (ours, work / f"{name}-llama.gguf"):
            path.unlink()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": cpu_name(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}
    (out / "gguf_export_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    keys = list(rows[-1])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "gguf_export_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
