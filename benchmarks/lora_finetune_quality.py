"""Does a LoRA / QLoRA fine-tune with holdall actually tailor SmolLM2-135M to a customer? On CPU, in minutes.

For one customer of the shipped dataset (src/holdall/data/customers/, see its README) — default C, the
Spanish customer-support client; ``--customer A|B|C``, ``--all`` for the three — this runs
``holdall.training.finetune`` twice on the same data, seed and step budget: ``lora`` (float32 base) and
``qlora`` (NF4 + double-quantized base, the adapters in float32). It reports

* the held-out eval loss (the eval split finetune itself holds out: ``eval_fraction`` of the records, seeded)
  before training (float base for LoRA, the NF4 base for QLoRA) and after;
* QLoRA's final eval loss relative to LoRA's (the issue's claim: within a few percent), for holdall and for the
  incumbents: ``peft-lora`` (transformers + peft, fp32 base) and ``peft-qlora`` (+ bitsandbytes NF4 + double
  quant), set up exactly as in lora_cpu_speed.py and trained by the same Trainer, data, schedule and seed;
* the house-style score (:func:`style_score`: the fraction of the customer's style markers present) of greedy
  generations on held-out prompts from the base model, the LoRA model and the QLoRA model, with two
  example generations printed;
* the loss-curve PNGs (train loss per step, eval loss every ``--steps/4`` steps).

Usage:
    python benchmarks/lora_finetune_quality.py                 # customer C, 4 methods, ~5-8 min each on 2 cores
    python benchmarks/lora_finetune_quality.py --all           # A, B and C
    python benchmarks/lora_finetune_quality.py --steps 2 --prompts 2 --max-new-tokens 16   # a dry run
Writes benchmarks/results/lora_finetune_quality.{json,md} and lora_finetune_quality_<customer>_<method>.png;
the adapters, metrics and checkpoints go to ``--work-dir`` (default out/lora_finetune_quality, git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

CUSTOMERS = {
    "A": ("medical", "client_a_medical.jsonl"),
    "B": ("legal", "client_b_legal.jsonl"),
    "C": ("support", "client_c_support_es.jsonl"),
}
METHODS = ("lora", "qlora", "qlora-gptq", "peft-lora", "peft-qlora")
# holdall methods -> (finetune method, QLoRA base quantization): qlora-gptq is QLoRA on an NF4 + DQ base whose codes
# were chosen by GPTQ error feedback on the training split's activations (same storage, same training path)
HOLDALL = {"lora": ("lora", "rtn"), "qlora": ("qlora", "rtn"), "qlora-gptq": ("qlora", "gptq")}
# The incumbents' models (transformers + peft, + bitsandbytes NF4/DQ for QLoRA, exactly the anchor's setup) trained
# by the same loop, data, optimizer, schedule and seed as holdall's: differences come from the models alone.
INCUMBENTS = {"peft-lora": False, "peft-qlora": True}
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# --- the house style of each customer -------------------------------------------------------------------------
MEDICAL_OPENING = "Clinical summary:"
MEDICAL_DISCLAIMER = "This is not a diagnosis; consult your physician."
LEGAL_RISK = re.compile(r"\|\s*RISK:\s*(low|medium|high)\.?$")
SUPPORT_OPENING = "¡Hola!"
SUPPORT_CLOSING = "¿Puedo ayudarte en algo más?"
# Function words that are unambiguous between the two languages (no "a", "no", "me" in either list).
SPANISH_WORDS = frozenset("el la los las de del que y en un una tu te tus por para con se lo es al sí más hoy "
                          "pedido tienes has está puedes hemos he será".split())
ENGLISH_WORDS = frozenset("the and you your to of is in for it we with be this that can will have are order".split())


def is_spanish(text: str) -> bool:
    """At least 3 Spanish function words and more than twice as many as English ones."""
    words = re.findall(r"[a-záéíóúñü]+", text.lower())
    spanish = sum(w in SPANISH_WORDS for w in words)
    english = sum(w in ENGLISH_WORDS for w in words)
    return spanish >= 3 and spanish > 2 * english


STYLE_MARKERS = {
    "medical": (
        lambda t: t.startswith(MEDICAL_OPENING),
        lambda t: "Key point:" in t,
        lambda t: t.endswith(MEDICAL_DISCLAIMER),
    ),
    "legal": (
        lambda t: t.startswith("SUMMARY:"),
        lambda t: "| OBLIGATIONS:" in t,
        lambda t: LEGAL_RISK.search(t) is not None,
    ),
    "support": (
        lambda t: t.startswith(SUPPORT_OPENING),
        lambda t: t.endswith(SUPPORT_CLOSING),
        is_spanish,
    ),
}


def customer_name(customer: str) -> str:
    """'C' or 'support' -> 'support'."""
    if customer.upper() in CUSTOMERS:
        return CUSTOMERS[customer.upper()][0]
    if customer in STYLE_MARKERS:
        return customer
    raise ValueError(f"unknown customer {customer!r}; use A, B, C or {', '.join(STYLE_MARKERS)}")


def style_score(customer: str, text: str) -> float:
    """Fraction of the customer's three house-style markers present in ``text`` (1.0 = fully on style)."""
    markers = STYLE_MARKERS[customer_name(customer)]
    text = text.strip()
    return sum(bool(marker(text)) for marker in markers) / len(markers)


def data_path(customer: str) -> Path:
    from holdall.data import DATA_DIR

    letter = next(k for k, (name, _) in CUSTOMERS.items() if name == customer_name(customer))
    return DATA_DIR / "customers" / CUSTOMERS[letter][1]


# --- measuring --------------------------------------------------------------------------------------------------
def held_out_conversations(path: Path, fraction: float, seed: int) -> list[list[dict]]:
    """The records finetune holds out: the same seeded split_eval over the records, in file order."""
    from holdall.training.data import read_jsonl, split_eval

    records = [messages for _, messages in read_jsonl(path)]
    _, held_out = split_eval(records, fraction, seed)
    return held_out


@torch.no_grad()
def eval_loss(model, examples, pad_id: int) -> float:
    """Token-mean loss over ``examples`` (batch 1, dropout off): what the Trainer reports as eval_loss."""
    from holdall.training.data import collate

    model.eval()
    total, count = 0.0, 0
    for example in examples:
        batch = collate([example], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    return total / count


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each conversation's user turn (the chat template the training data was rendered with)."""
    model.eval()
    answers = []
    for messages in conversations:
        prompt = [m for m in messages if m["role"] != "assistant"]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        # use_cache=True: training switched the config's cache off for gradient checkpointing
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


_T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr with the elapsed time: a run takes minutes, and its phases differ a lot in cost."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- one method, one customer -----------------------------------------------------------------------------------
def finetune_config(method: str, args):
    from holdall.training import FinetuneConfig

    method, base_quant = HOLDALL.get(method, (method, "rtn"))
    return FinetuneConfig(
        method=method, base_quant=base_quant, max_steps=args.steps, lr=args.lr, max_len=args.max_len, packing=True,
        eval_fraction=args.eval_fraction, eval_every=max(1, args.steps // 4), seed=args.seed,
        device="cpu", progress=args.progress,
    )


def run_method(method: str, customer: str, prompts: list[list[dict]], args, want_base: bool) -> dict:
    """Fine-tune one fresh base with ``method``; eval loss before/after and generations (base ones too if asked)."""
    from holdall.models import load_model
    from holdall.training import build_datasets, finetune, quantize_for_qlora

    path = data_path(customer)
    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # exactly the eval windows finetune will use (same file, max_len, packing, fraction, seed)
    data = build_datasets(path, tokenizer, args.max_len, True, args.eval_fraction, args.seed)
    result = {"method": method}
    log(f"{customer}/{method}: {len(data.train)} train / {len(data.eval)} eval windows of <= {args.max_len} tokens")
    if want_base:
        log(f"{customer}: base generations and eval loss")
        result["base_generations"] = generate(model, tokenizer, prompts, args.max_new_tokens)
        result["base_eval_loss"] = eval_loss(model, data.eval, pad_id)
    if method in INCUMBENTS:
        return run_incumbent(method, customer, prompts, args, data, result, model, tokenizer, pad_id)
    if method == "qlora":
        # quantized here rather than inside finetune so "before" is measured on the NF4 base QLoRA trains on;
        # finetune keeps an already-quantized base as it is
        quantize_for_qlora(model)
        result["eval_loss_before"] = eval_loss(model, data.eval, pad_id)
    elif method == "qlora-gptq":
        # exactly what finetune does for base_quant="gptq": calibration windows from the training split only
        from holdall.training.qlora import calibration_from_examples

        config = finetune_config(method, args)
        base = config.qlora_base()
        ids = calibration_from_examples(data.train, base.calib_samples, config.calibration_seq_len(), args.seed)
        log(f"{customer}/{method}: GPTQ-NF4 base on {ids.shape[0]}x{ids.shape[1]} training-split tokens")
        started = time.perf_counter()
        quantize_for_qlora(model, base=base, calibration_ids=ids, seq_len=config.calibration_seq_len())
        result["base_quant_seconds"] = round(time.perf_counter() - started, 1)
        result["eval_loss_before"] = eval_loss(model, data.eval, pad_id)
    else:  # LoRA starts from the float base itself (B = 0): no need to score it twice
        result["eval_loss_before"] = result.get("base_eval_loss") or eval_loss(model, data.eval, pad_id)
    log(f"{customer}/{method}: eval loss before {result['eval_loss_before']:.4f}; fine-tuning {args.steps} steps")
    work = fresh_work_dir(args, customer, method)
    started = time.perf_counter()
    trained = finetune(model, path, finetune_config(method, args), work, tokenizer=tokenizer)
    result["train_seconds"] = round(time.perf_counter() - started, 1)
    result["trainable"] = trained.trainable
    return finish_method(result, trained, model, tokenizer, data, prompts, customer, method, args)


def fresh_work_dir(args, customer: str, method: str) -> Path:
    work = Path(args.work_dir) / customer / method
    if work.exists():
        shutil.rmtree(work)  # a fresh run, never a resumed one
    return work


def finish_method(result, trained, model, tokenizer, data, prompts, customer, method, args) -> dict:
    """Record a trained run (finetune's or the Trainer's result: same fields), generate, keep the loss curve."""
    result.update(
        steps=trained.steps, eval_loss_after=trained.eval_loss, train_loss_last=trained.train_loss,
        train_tokens=trained.tokens, tokens_per_s=round(trained.tokens_per_s, 1),
        train_windows=len(data.train), eval_windows=len(data.eval),
    )
    log(f"{customer}/{method}: eval loss after {fmt(trained.eval_loss)} ({result['train_seconds']} s); generating")
    result["generations"] = generate(model, tokenizer, prompts, args.max_new_tokens)
    result["loss_curve"] = copy_loss_curve(trained.plot_path, customer, method, args.out, args.name)
    del model
    gc.collect()
    return result


def run_incumbent(method, customer, prompts, args, data, result, model, tokenizer, pad_id) -> dict:
    """peft LoRA (fp32 base) or peft + bitsandbytes QLoRA (NF4 + DQ), trained by holdall's Trainer with the
    very TrainerConfig finetune uses (bf16 autocast on this CPU when finetune would pick it)."""
    from lora_cpu_speed import peft_model

    from holdall.training import Trainer
    from holdall.training.finetune import pick_compute_dtype

    del model  # the peft configurations load their own copy, as the anchor does
    gc.collect()
    torch.manual_seed(args.seed)
    model = peft_model(qlora=INCUMBENTS[method])
    result["eval_loss_before"] = eval_loss(model, data.eval, pad_id)
    log(f"{customer}/{method}: eval loss before {result['eval_loss_before']:.4f}; fine-tuning {args.steps} steps")
    work = fresh_work_dir(args, customer, method)
    compute = pick_compute_dtype("auto", torch.device("cpu"))
    autocast = None if compute == torch.float32 else compute
    config = finetune_config("qlora" if INCUMBENTS[method] else "lora", args).trainer_config(autocast)
    trainer = Trainer(model, data.train, data.eval, config, work, pad_id=pad_id,
                      save_model=lambda m, d: m.save_pretrained(d))
    started = time.perf_counter()
    trained = trainer.train()
    result.update(train_seconds=round(time.perf_counter() - started, 1), trainable="(peft)", compute=str(compute))
    return finish_method(result, trained, model, tokenizer, data, prompts, customer, method, args)


def copy_loss_curve(plot: Path | None, customer: str, method: str, out: Path,
                    name: str = "lora_finetune_quality") -> str | None:
    """Keep the PNG beside the results (the work dir also holds 60 MB of adapter and checkpoint)."""
    if plot is None or not Path(plot).is_file():
        return None
    target = Path(out) / f"{name}_{customer}_{method}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plot, target)
    return str(target.relative_to(REPO)) if target.is_relative_to(REPO) else str(target)


def run_customer(customer: str, args) -> dict:
    path = data_path(customer)
    prompts = held_out_conversations(path, args.eval_fraction, args.seed)[: args.prompts]
    runs = {m: run_method(m, customer, prompts, args, want_base=(i == 0)) for i, m in enumerate(args.methods)}
    first = runs[args.methods[0]]
    base_generations = first.pop("base_generations")
    summary = {
        "customer": customer,
        "data": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "base_eval_loss": first.pop("base_eval_loss"),
        "style": {"base": mean([style_score(customer, g) for g in base_generations])},
        "methods": runs,
    }
    for method, run in runs.items():
        run["style_score"] = mean([style_score(customer, g) for g in run["generations"]])
        summary["style"][method] = run["style_score"]
    for q in ("qlora", "qlora-gptq"):
        if "lora" in runs and q in runs:
            lora, qlora = runs["lora"]["eval_loss_after"], runs[q]["eval_loss_after"]
            summary[f"{q}_vs_lora_eval_loss_pct"] = 100.0 * (qlora / lora - 1.0)
    if "peft-lora" in runs and "peft-qlora" in runs:
        lora, qlora = runs["peft-lora"]["eval_loss_after"], runs["peft-qlora"]["eval_loss_after"]
        summary["peft_qlora_vs_peft_lora_eval_loss_pct"] = 100.0 * (qlora / lora - 1.0)
    for mine, theirs in (("lora", "peft-lora"), ("qlora", "peft-qlora")):
        if mine in runs and theirs in runs:
            ratio = runs[mine]["eval_loss_after"] / runs[theirs]["eval_loss_after"]
            summary[f"{mine}_vs_{theirs}_eval_loss_pct"] = 100.0 * (ratio - 1.0)
    summary["examples"] = [
        {"prompt": next(m["content"] for m in conv if m["role"] == "user"),
         "reference": next(m["content"] for m in conv if m["role"] == "assistant"),
         "base": base_generations[i], **{m: runs[m]["generations"][i] for m in runs}}
        for i, conv in enumerate(prompts)
    ]
    return summary


# --- reporting --------------------------------------------------------------------------------------------------
def machine() -> dict:
    from machine_info import cpu_name

    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def fmt(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# LoRA vs QLoRA fine-tune quality: holdall beside peft (+ bitsandbytes), SmolLM2-135M-Instruct, CPU",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}. "
        f"{cfg['steps']} steps, lr {cfg['lr']}, seq {cfg['max_len']} (packed), batch 1, r=16 alpha 32 dropout 0.05 all-linear, "
        f"eval split {cfg['eval_fraction']:.0%} of the records (seed {cfg['seed']}), {cfg['prompts']} held-out prompts, "
        f"greedy, {cfg['max_new_tokens']} new tokens max.",
        "",
        "| customer | method | eval loss before | eval loss after | train s | tok/s | style score (base → tuned) | loss curve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["customers"]:
        for method, run in c["methods"].items():
            lines.append(
                f"| {c['customer']} | {method} | {fmt(run['eval_loss_before'])} | {fmt(run['eval_loss_after'])} | "
                f"{run['train_seconds']} | {run['tokens_per_s']} | {c['style']['base']:.2f} → {run['style_score']:.2f} | "
                f"{run['loss_curve'] or 'n/a'} |"
            )
    lines.append("")
    for c in report["customers"]:
        for key, label in (("qlora_vs_lora_eval_loss_pct", "holdall QLoRA vs holdall LoRA"),
                           ("qlora-gptq_vs_lora_eval_loss_pct", "holdall QLoRA (GPTQ-NF4 base) vs holdall LoRA"),
                           ("peft_qlora_vs_peft_lora_eval_loss_pct", "peft+bnb QLoRA vs peft LoRA"),
                           ("lora_vs_peft-lora_eval_loss_pct", "holdall LoRA vs peft LoRA"),
                           ("qlora_vs_peft-qlora_eval_loss_pct", "holdall QLoRA vs peft+bnb QLoRA")):
            if key in c:
                lines.append(f"- {c['customer']}: final eval loss, {label}: {c[key]:+.2f}%")
    lines.append("")
    for c in report["customers"]:
        lines.append(f"## Examples: {c['customer']}")
        for ex in c["examples"][:2]:
            lines += ["", f"**Prompt:** {ex['prompt']}", "", f"- reference: {ex['reference']}", f"- base: {ex['base']}"]
            lines += [f"- {m}: {ex[m]}" for m in METHODS if m in ex]
        lines.append("")
    return "\n".join(lines) + "\n"


def print_customer(c: dict) -> None:
    print(f"\n=== customer {c['customer']} ({c['data']}) ===")
    print(f"base eval loss {c['base_eval_loss']:.4f}; style score base {c['style']['base']:.2f}")
    for method, run in c["methods"].items():
        print(f"{method:6s} eval loss {fmt(run['eval_loss_before'])} -> {fmt(run['eval_loss_after'])}  "
              f"style {run['style_score']:.2f}  {run['steps']} steps in {run['train_seconds']} s "
              f"({run['tokens_per_s']} tok/s)  curve {run['loss_curve']}")
    for key in [k for k in c if k.endswith("_eval_loss_pct")]:
        print(f"{key}: {c[key]:+.2f}%")
    for ex in c["examples"][:2]:
        print(f"\nprompt: {ex['prompt']}")
        for key in ("reference", "base", *c["methods"]):
            print(f"  {key:9s}: {ex[key]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customer", default="C", help="A (medical), B (legal) or C (Spanish support); default C")
    p.add_argument("--all", action="store_true", help="all three customers")
    p.add_argument("--methods", default="lora,qlora,peft-lora,peft-qlora",
                   help="comma-separated subset of lora,qlora,qlora-gptq,peft-lora,peft-qlora (the last two: the "
                   "incumbents; qlora-gptq: QLoRA on a GPTQ-calibrated NF4 base)")
    p.add_argument("--name", default="lora_finetune_quality",
                   help="results file stem under --out (default lora_finetune_quality)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per method (~5-8 min each on 2 quiet cores)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts generated from")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true", help="show finetune's progress bar")
    p.add_argument("--work-dir", default=str(REPO / "out" / "lora_finetune_quality"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    customers = [CUSTOMERS[k][0] for k in CUSTOMERS] if args.all else [customer_name(args.customer)]
    started = time.perf_counter()
    report = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "progress", "name")},
        "customers": [],
    }
    for customer in customers:
        report["customers"].append(run_customer(customer, args))
        print_customer(report["customers"][-1])
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report), encoding="utf-8")
    print(f"\nwrote {args.out / (args.name + '.json')} and .md in {report['total_seconds']} s")
    return report


if __name__ == "__main__":
    main()
