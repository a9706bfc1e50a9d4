"""Quality and time of holdall's RTN, HQQ, GPTQ (plain and act-order) and AWQ on SmolLM2-135M, in one run.

Protocol (the one `/work/shared/reference/anchors.md` used for llm-compressor, so the numbers sit beside its):

* model: SmolLM2-135M-Instruct, fp32 (`holdall.load_model("smollm2")`, dequantized from the packaged GGUF);
* calibration (GPTQ, AWQ): 32 windows x 512 tokens of the shipped WikiText-2 *valid* split, seed 0 — the
  window draw is `random.Random(0).randrange(0, n - 512)`, the same as the anchor script's, so with the same
  tokenizer these are the very windows llm-compressor was calibrated on;
* evaluation: the first 4 windows x 2048 tokens of WikiText-2 *test* (GPTQ/AWQ protocol: text tokenized once,
  non-overlapping windows, every position scored), perplexity plus mean token KL(float || quantized) and top-1
  agreement against the float model on the same windows;
* settings: symmetric int, groups of 128 (576 = 4.5 x 128: a partial last group, which llm-compressor refuses)
  and groups of 64 (the only size llm-compressor accepts on this model), 4 and 3 bits; lm_head and embeddings
  stay float.

Methods per setting: `rtn`; `hqq` (symmetric: the scale is optimized, same storage as the others);
`hqq-asym` (HQQ's native asymmetric form: it stores zeros, so it costs `bits/group` more bits per weight);
`gptq`; `gptq-act` (act-order with static groups); `awq` (AutoAWQ's defaults: duo scaling, 20-point grid, clip
search; symmetric here like the other rows, so the storage is the same). Quantize time is wall-clock on this machine.

`llmc-gptq`: llm-compressor's own GPTQ, side by side in the same run: it lives in its own virtual environment
(llm-compressor 0.14 pins transformers 5.17; `--llmc-python`, default `/work/lcvenv/bin/python`), so this script
saves the float model and the very calibration windows holdall uses, runs `llmcompressor_gptq.py` there (its
GPTQModifier with its defaults: static act-order, dampening 0.01), and reads the compressed checkpoint back with
holdall's compressed-tensors reader (bit-exact with transformers + compressed-tensors: tests/test_formats_*):
both tools are scored by the same code on the same windows. anchors.md's numbers still print as "anchor".

Usage:
  python benchmarks/gptq_quality.py                      # the full protocol (~tens of minutes on 2 CPU cores)
  python benchmarks/gptq_quality.py --dry-run --out /tmp/gptq-dry   # 2 x 64 calibration, 1 x 256 eval, w4g128
Writes gptq_quality.json and gptq_quality.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import holdall
from holdall.algorithms import AWQConfig, CalibrationConfig, GPTQConfig, HQQConfig, QuantConfig, quantize
from holdall.data import wikitext2
from holdall.evaluation.perplexity import evaluate_many
from holdall.evaluation.text import load_text
from machine_info import cpu_name  # benchmarks/ is on sys.path when a benchmark runs as a script

# anchors.md, "llm-compressor's GPTQ and AWQ on this CPU": same model, calibration and evaluation protocol
ANCHORS = {
    (4, 64): {"llm-compressor gptq": (24.317, 136.1), "rtn, absmax/(2^(b-1)-1) convention": (28.432, None)},
    (3, 64): {"llm-compressor gptq": (65.664, 128.8), "rtn, absmax/(2^(b-1)-1) convention": (189.202, None)},
    (4, 128): {"rtn, absmax/(2^(b-1)-1) convention": (31.213, None)},
}
ANCHOR_BASE_PPL = 20.256
METHODS = ("rtn", "hqq", "hqq-asym", "gptq", "gptq-act", "awq", "llmc-gptq")


def method_config(method: str, bits: int, group: int, calibration: CalibrationConfig) -> QuantConfig:
    """The QuantConfig of one benchmark row."""
    if method == "rtn":
        return QuantConfig.for_method("rtn", bits=bits, group_size=group)
    if method in ("hqq", "hqq-asym"):
        return QuantConfig.for_method(
            "hqq", bits=bits, group_size=group, symmetric=method == "hqq", options=HQQConfig()
        )
    if method == "awq":
        return QuantConfig.for_method(
            "awq", bits=bits, group_size=group, symmetric=True, options=AWQConfig(), calibration=calibration
        )
    return QuantConfig.for_method(
        "gptq", bits=bits, group_size=group, symmetric=True,
        options=GPTQConfig(act_order=method == "gptq-act"), calibration=calibration,
    )


def bits_per_weight(model: torch.nn.Module) -> float:
    """Storage bits per weight of the quantized linears (codes, scales, zeros)."""
    bits = numel = 0
    for module in model.modules():
        if isinstance(module, holdall.QuantLinear):
            bits += 8 * module.quantized_weight.nbytes
            numel += module.in_features * module.out_features
    return bits / numel


def run_setting(base, tokenizer, test_text, bits, group, methods, calibration, args) -> dict[str, dict]:
    """Quantize one (bits, group) setting with every method, score all of them on the same windows."""
    models, rows = {}, {}
    for method in methods:
        name = f"{method} w{bits}g{group}"
        if method == "llmc-gptq":
            try:
                models[name], seconds, cpu_seconds = run_llm_compressor(base, tokenizer, bits, group, calibration,
                                                                        args)
            except ReferenceRefused as refused:  # a row that says why, not an aborted multi-setting run
                rows[name] = {"method": method, "bits": bits, "group": group, "refused": str(refused)}
                print(f"{name}: llm-compressor refused: {refused}", flush=True)
                continue
            rows[name] = {"method": method, "bits": bits, "group": group, "quantize_s": seconds,
                          "quantize_cpu_s": cpu_seconds,
                          "bits_per_weight": bits_per_weight(models[name])}
            print(f"{name}: quantized by llm-compressor in {seconds:.1f} s", flush=True)
            continue
        config = method_config(method, bits, group, calibration)
        start, cpu_start = time.perf_counter(), time.process_time()
        qmodel = quantize(copy.deepcopy(base), config, progress=args.progress, tokenizer=tokenizer)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        models[name] = qmodel
        rows[name] = {"method": method, "bits": bits, "group": group, "quantize_s": seconds,
                      "quantize_cpu_s": cpu_seconds,
                      "bits_per_weight": bits_per_weight(qmodel)}
        report = qmodel.holdall_quant.get("report")
        if report:
            ratios = [i["rel_error"] / i["rtn_rel_error"] for i in report["linears"].values() if i["rtn_rel_error"]]
            rows[name]["linear_error_vs_rtn"] = sum(ratios) / len(ratios)
            rows[name]["notes"] = [f"{n}: {note}" for n, i in report["linears"].items() for note in i["notes"]]
        print(f"{name}: quantized in {seconds:.1f} s", flush=True)
    results = evaluate_many(models, tokenizer, test_text, base=base, seq_len=args.seq_len,
                            max_windows=args.windows, progress=args.progress)
    for name, result in results.items():
        rows[name].update(ppl=result.ppl, kld=result.kld_mean, top1=result.top1_agreement,
                          base_ppl=result.base_ppl, scored_tokens=result.n_tokens)
    return rows


class ReferenceRefused(RuntimeError):
    """The reference tool exited with an error for this setting (llm-compressor refuses group 128 on 576 columns)."""


def _last_error_line(stderr: str) -> str:
    """The exception line of a Python traceback (the last line that names an error), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or ["exited with an error and no message"])[-1][:300]


def run_llm_compressor(base, tokenizer, bits: int, group: int, calibration: CalibrationConfig, args):
    """llm-compressor's GPTQ in its own venv on the same float model and calibration windows; the result read
    back by holdall. Returns ``(model, oneshot wall seconds, oneshot process CPU seconds)``."""
    import subprocess
    import tempfile

    from holdall.algorithms.calibration import calibration_ids
    from holdall.models.loading import save_hf

    python = Path(args.llmc_python)
    if not python.is_file():
        raise SystemExit(f"llm-compressor's python {python} does not exist; create its venv (see "
                         "benchmarks/make_llmcompressor_fixture.py) or pass --llmc-python")
    with tempfile.TemporaryDirectory(prefix="llmc-") as tmp:
        tmp = Path(tmp)
        save_hf(base, tokenizer, tmp / "base")
        torch.save(calibration_ids(calibration, tokenizer), tmp / "calib.pt")
        threads = str(args.threads or torch.get_num_threads())
        command = [str(python), str(Path(__file__).parent / "llmcompressor_gptq.py"), str(tmp / "base"),
                   str(tmp / "calib.pt"), str(bits), str(group), str(tmp / "out"), threads]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ReferenceRefused(_last_error_line(done.stderr))
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        model, _ = holdall.load_model(tmp / "out", dtype=torch.float32)
    return model, timing["quantize_s"], timing.get("quantize_cpu_s")


def _or_dash(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" when nothing was measured (every row refused)."""
    return "-" if value is None else format(value, spec)


def render_markdown(meta: dict, rows: dict[str, dict]) -> str:
    lines = [
        f"SmolLM2-135M-Instruct fp32; calibration {meta['calibration']}; evaluation WikiText-2 test, "
        f"{meta['windows']} x {meta['seq_len']} tokens ({_or_dash(meta['scored_tokens'], ',')} scored); base PPL "
        f"{_or_dash(meta['base_ppl'], '.3f')} (anchor run: {ANCHOR_BASE_PPL}); machine: {meta['machine']}; "
        f"{meta['date']}.",
        "",
        "| setting | method | PPL | KLD vs float | top-1 agree | bits/weight | quantize s | quantize CPU s | "
        "linear err / RTN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "refused" in r:
            lines.append(f"| w{r['bits']}g{r['group']} | {r['method']} | refused: {r['refused']} | - | - | - | - | - "
                         "| - |")
            continue
        ratio = f"{r['linear_error_vs_rtn']:.3f}" if "linear_error_vs_rtn" in r else "-"
        cpu = f"{r['quantize_cpu_s']:.1f}" if r.get("quantize_cpu_s") is not None else "-"
        lines.append(
            f"| w{r['bits']}g{r['group']} | {r['method']} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.3f} | "
            f"{r['bits_per_weight']:.3f} | {r['quantize_s']:.1f} | {cpu} | {ratio} |"
        )
    for (bits, group), anchors in ANCHORS.items():
        if any(r["bits"] == bits and r["group"] == group for r in rows.values()):
            for name, (ppl, seconds) in anchors.items():
                lines.append(f"| w{bits}g{group} | {name} (anchor) | {ppl:.3f} | - | - | - | "
                             f"{'-' if seconds is None else f'{seconds:.1f}'} | - | - |")
    notes = [note for r in rows.values() for note in r.get("notes", ())]
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=4, help="2048-token windows of WikiText-2 test (anchor: 4)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--settings", default="w4g128,w3g128,w4g64,w3g64", help="comma-separated wBgG settings")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--device", default=None, help="where GPTQ/AWQ calibrate each layer (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes to prove the script runs end to end")
    parser.add_argument("--progress", action="store_true", help="show per-layer / per-window progress bars")
    parser.add_argument("--llmc-python", default="/work/lcvenv/bin/python",
                        help="python of llm-compressor's own venv (for --methods llmc-gptq)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.dry_run:
        args.windows, args.seq_len, args.calib_samples, args.calib_seq_len = 1, 256, 2, 64
        if args.settings == parser.get_default("settings"):
            args.settings = "w4g128"
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [(int(s[1 : s.index("g")]), int(s[s.index("g") + 1 :])) for s in args.settings.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    calibration = CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                                    device=args.device)

    base, tokenizer = holdall.load_model(args.model, dtype=torch.float32)
    test_text = load_text(wikitext2("test"))
    rows: dict[str, dict] = {}
    for bits, group in settings:
        rows.update(run_setting(base, tokenizer, test_text, bits, group, methods, calibration, args))
        table = write_results(rows, args)  # after every setting: a long run killed later keeps what it measured
    print(table)


def write_results(rows: dict[str, dict], args: argparse.Namespace) -> str:
    """Write gptq_quality.json / .md for the rows measured so far into ``args.out``; return the markdown."""
    first = next((r for r in rows.values() if "refused" not in r), {})  # {}: every row so far was refused
    meta = {
        "model": args.model,
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens of WikiText-2 valid (seed 0)",
        "seq_len": args.seq_len,
        "windows": args.windows,
        "scored_tokens": first.get("scored_tokens"),
        "base_ppl": first.get("base_ppl"),
        "machine": f"{cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "dry_run": args.dry_run,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = render_markdown(meta, rows)
    (out / "gptq_quality.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
