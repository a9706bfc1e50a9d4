"""How close is QLoRA's NF4 base to the float model before any training? Round-to-nearest vs GPTQ-chosen codes.

The QLoRA base is stored as NF4 + double quant (blocks of 64) either way — same bytes, same dequantization. What
differs is how the 4-bit codes were chosen: bitsandbytes' round-to-nearest (``rtn``) or GPTQ error feedback against
each linear's input Hessian, layer by layer (``holdall.training.qlora.QLoraBase(method="gptq")``), with or without
act-order and the least-squares re-fit of the block scales, calibrated on the customer's *training* split (what
``holdall finetune --base-quant gptq`` does by default) or on the shipped WikiText-2 *valid* split.

For each variant on SmolLM2-135M it reports:
* the held-out loss on the customer's eval records (exactly the eval split ``lora_finetune_quality.py`` uses);
* perplexity and mean KL divergence against the float model on the first ``--wiki-windows`` windows of 512 tokens
  of WikiText-2 *test* (general text, never used for calibration);
* the calibration time.

Usage:
    python benchmarks/qlora_gptq_base.py --customer C --threads 1
Writes benchmarks/results/qlora_gptq_base.{json,md} (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_finetune_quality import REPO, RESULTS, customer_name, data_path, eval_loss, machine  # noqa: E402

# name -> (calibration source, act_order, refit_scales); None = round-to-nearest
VARIANTS = {
    "rtn": None,
    "gptq": ("train", False, False),
    "gptq+act": ("train", True, False),
    "gptq+act+refit": ("train", True, True),
    "gptq+act+refit (wikitext calib)": ("wikitext", True, True),
}


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customer", default="C")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--wiki-windows", type=int, default=16, help="WikiText-2 test windows of 512 tokens (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="qlora_gptq_base")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    torch.set_num_threads(args.threads)

    from holdall.data import wikitext2
    from holdall.evaluation.perplexity import evaluate
    from holdall.models import load_model
    from holdall.training import build_datasets, quantize_for_qlora
    from holdall.training.qlora import QLoraBase, calibration_from_examples

    t0 = time.perf_counter()
    customer = customer_name(args.customer)
    path = data_path(customer)
    base_model, tokenizer = load_model("smollm2", dtype=torch.float32)
    base_model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = build_datasets(path, tokenizer, args.max_len, True, args.eval_fraction, args.seed)
    train_ids = calibration_from_examples(data.train, args.calib_samples, min(args.max_len, 512), args.seed)
    wiki = wikitext2("test").read_text(encoding="utf-8") if args.wiki_windows else None
    rows = {}

    def score(name: str, model, seconds: float | None) -> None:
        row = {"held_out_loss": eval_loss(model, data.eval, pad_id), "calibration_seconds": seconds}
        if wiki is not None:
            r = evaluate(model, tokenizer, wiki, seq_len=512, max_windows=args.wiki_windows,
                         base_model=None if model is base_model else base_model, progress=False)
            row.update(wiki_ppl=r.ppl, wiki_kld=r.kld_mean, wiki_top1=r.top1_agreement)
        rows[name] = row
        _log(f"{name}: {json.dumps(row)}", t0)

    score("float", base_model, None)
    for name in variants:
        model, _ = load_model("smollm2", dtype=torch.float32)
        started = time.perf_counter()
        spec = VARIANTS[name]
        if spec is None:
            quantize_for_qlora(model)
        else:
            source, act, refit = spec
            base = QLoraBase(method="gptq", calib_samples=args.calib_samples, calib_seq_len=min(args.max_len, 512),
                             act_order=act, refit_scales=refit, seed=args.seed)
            if source == "train":
                quantize_for_qlora(model, base=base, calibration_ids=train_ids)
            else:
                quantize_for_qlora(model, base=base, tokenizer=tokenizer)
        seconds = round(time.perf_counter() - started, 1)
        model.eval()
        score(name, model, seconds)
        del model
        gc.collect()

    report = {
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "customer": customer,
        "calibration": f"{train_ids.shape[0]}x{train_ids.shape[1]} tokens of the training split "
                       f"(wikitext variant: {args.calib_samples}x{min(args.max_len, 512)} of WikiText-2 valid)",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    rows = report["rows"]
    float_loss = rows["float"]["held_out_loss"]
    lines = [
        f"# QLoRA's NF4 + DQ base before training: round-to-nearest vs GPTQ-chosen codes (SmolLM2-135M, customer "
        f"{report['customer']})",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}. "
        f"Calibration: {report['calibration']}. WikiText-2 test: first {report['config']['wiki_windows']} windows of 512.",
        "",
        "| base | held-out loss | vs float | WikiText-2 test PPL | KLD vs float | top-1 agree | calibration s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        pct = 100.0 * (r["held_out_loss"] / float_loss - 1.0)
        kld = "—" if r.get("wiki_kld") is None else f"{r['wiki_kld']:.4f}"
        top1 = "—" if r.get("wiki_top1") is None else f"{r['wiki_top1']:.3f}"
        ppl = "—" if r.get("wiki_ppl") is None else f"{r['wiki_ppl']:.2f}"
        secs = "—" if r["calibration_seconds"] is None else f"{r['calibration_seconds']}"
        lines.append(f"| {name} | {r['held_out_loss']:.4f} | {pct:+.1f}% | {ppl} | {kld} | {top1} | {secs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
