"""GGUF export of SmolLM2-135M: holdall's ``export_gguf`` per file type vs llama.cpp's ``llama_model_quantize``.

The model is SmolLM2-135M-Instruct dequantized from the packaged Q4_1 GGUF (the only weights available offline).
holdall first writes an F16 GGUF; llama.cpp quantizes that file (what ``llama-quantize`` does), holdall exports
straight from the in-memory model. For each file type this records both wall times, the file sizes, and how many
tensors have the same type and the same bytes in both files (with holdall's non-calibrated encoders: all).

Usage:  python benchmarks/gguf_export_speed.py [--types Q4_K_M Q8_0 ...] [--out benchmarks/results]
Writes gguf_export_speed.json and gguf_export_speed.md.

        python benchmarks/gguf_export_speed.py --per-encoder [--encoders Q3_K Q4_K ...] [--repeats 5]
times each encoder alone on one 4096x4096 float32 tensor (normal, std 0.02), single-threaded, holdall's
``quants.quantize`` against libggml's ``ggml_quantize_chunk`` (the C quantizer llama-quantize runs), without and
with an importance matrix; the best of ``--repeats`` interleaved runs of each, the bytes checked equal. Writes
gguf_encoder_speed.json and gguf_encoder_speed.md.
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


def _ggml_quantize_chunk():
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def per_encoder(names: list[str], repeats: int, out: Path) -> None:
    """Each encoder alone, single-threaded, against libggml's C quantizer on the same tensor."""
    import numpy as np

    from holdall.formats.gguf import quants

    chunk = _ggml_quantize_chunk()
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32)
    imatrix = rng.uniform(0.1, 4.0, 4096).astype(np.float32)
    rows = []
    for name in names:
        type_id = quants.TYPES[name][0]
        for imat in (None, imatrix):
            want = np.empty((4096, quants.row_bytes(name, 4096)), np.uint8)
            c_s, ours_s = [], []
            for _ in range(repeats):
                start = time.process_time()
                imat_ptr = None if imat is None else imat.ctypes.data
                chunk(type_id, W.ctypes.data, want.ctypes.data, 0, 4096, 4096, imat_ptr)
                c_s.append(time.process_time() - start)
                start = time.process_time()
                got = quants.quantize(W, name, imat)
                ours_s.append(time.process_time() - start)
            rows.append({"type": name, "imatrix": imat is not None, "holdall_s": round(min(ours_s), 3),
                         "libggml_s": round(min(c_s), 3), "ratio": round(min(ours_s) / min(c_s), 2),
                         "same_bytes": bool(np.array_equal(got, want))})
            print(rows[-1], flush=True)
    record = {"machine": cpu_name(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "clock": "process CPU time (time.process_time), best of the repeats", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_encoder_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    keys = list(rows[-1])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (out / "gguf_encoder_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=[n for n, ft in FILE_TYPES.items() if ft.is_quantized])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--per-encoder", action="store_true", help="time each encoder alone vs libggml's C")
    parser.add_argument("--encoders", nargs="+",
                        default=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.per_encoder:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        per_encoder(args.encoders, args.repeats, Path(args.out))
        return
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
