"""LoRA / QLoRA training-step speed and peak memory on CPU: holdall beside transformers + peft (+ bitsandbytes).

One run, one machine, the same work for every configuration: SmolLM2-135M-Instruct (fp32, dequantized from
the packaged GGUF), sequences of 512 tokens, batch 1, LoRA r=16 alpha 32 dropout 0.05 on all 7 decoder linears
(q k v o gate up down), gradient checkpointing, AdamW (lr 1e-4), ``torch.set_num_threads(2)``:

* ``peft-lora``       transformers + peft on the fp32 base, exactly as /work/shared/anchors/cpu_hf_stack.py
                      (reentrant checkpointing + enable_input_require_grads, plain torch AdamW, no clipping);
* ``peft-bnb-qlora``  transformers + peft + bitsandbytes: NF4 + double quant, bf16 compute under autocast,
                      prepare_model_for_kbit_training, as the anchor (slow on CPU, ~100 s/step: it gets its own,
                      smaller ``--bnb-steps/--bnb-warmup``; ``--skip-bnb-qlora`` leaves it out);
* ``holdall-lora``    holdall's fine-tuning path on the fp32 base;
* ``holdall-qlora``   holdall's path on the NF4 + double-quant base, compute dtype as finetune picks it ("auto":
                      bf16 autocast on CPUs with native bf16 math — AVX512-BF16/AMX — else fp32);
* ``holdall-qlora-fp32`` the same with fp32 compute forced (what a CPU without native bf16 gets);
* ``holdall-lora-fast`` / ``holdall-qlora-fast`` the same as holdall-lora / holdall-qlora with ``fast_step=True``
                      (``training.fast_step``: it computes in the loaded model's dtype — fp32 for LoRA, bf16 for
                      QLoRA on a CPU with native bf16 — and does its own checkpointing).

The holdall configurations run what ``holdall.training.finetune`` runs, step for step: ``load_model`` ->
``prepare_model`` (quantize for qlora, ``add_lora``, gradient checkpointing) -> ``Trainer.train`` with the
TrainerConfig ``FinetuneConfig.trainer_config`` builds (so gradient clipping at 1.0 is on, as a user gets it).
Only the data differs from a finetune() call: every configuration trains on the same full 512-token windows
(the shipped WikiText-2 test split, tokenized and packed by holdall.training.data), so every step does the
same work. Per-step times come from the trainer's own metrics log (cumulative tokens / tokens per second).

Each configuration runs in its own subprocess, so ru_maxrss is that configuration's peak RSS (model loading
included: the holdall QLoRA base is quantized from an fp32 load, as finetune does it).

Usage:
    python benchmarks/lora_cpu_speed.py                                  # ~9 min with bnb QLoRA (~108 s/step), ~3 min without
    python benchmarks/lora_cpu_speed.py --steps 1 --warmup 0 --skip-bnb-qlora --out /tmp/dry   # a dry run
Writes benchmarks/results/lora_cpu_speed.{json,md}. Run it on a quiet machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEQ = 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
CONFIGS = ("peft-lora", "peft-bnb-qlora", "holdall-lora", "holdall-qlora", "holdall-qlora-fp32", "holdall-lora-fast",
           "holdall-qlora-fast")
# holdall configuration -> (method, compute dtype setting). LoRA is compared in fp32, like peft's; QLoRA uses
# what finetune picks ("auto": bf16 on CPUs with native bf16 math, else fp32) and, for reference, forced fp32.
HOLDALL = {"holdall-lora": ("lora", "float32", False), "holdall-qlora": ("qlora", "auto", False),
           "holdall-qlora-fp32": ("qlora", "float32", False), "holdall-lora-fast": ("lora", "float32", True),
           "holdall-qlora-fast": ("qlora", "auto", True)}
BASELINE = "peft-lora"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --- shared by every worker -------------------------------------------------------------------------------------
def training_windows(tokenizer, n: int) -> list:
    """``n`` full ``SEQ``-token windows (holdall Examples) of the WikiText-2 test split, packed by holdall."""
    from holdall.data import wikitext2
    from holdall.training.data import pack, read_text_documents, tokenize_document

    docs = read_text_documents(wikitext2("test"))
    examples, tokens = [], 0
    for doc in docs:  # tokenize only what the windows need (the whole split takes a while on 2 busy cores)
        examples.append(tokenize_document(doc, tokenizer))
        tokens += len(examples[-1])
        if tokens > (n + 1) * SEQ:
            break
    windows = [w for w in pack(examples, SEQ, tokenizer.eos_token_id) if len(w) == SEQ]
    return windows[:n]


def hf_dir() -> Path:
    """The HF directory holdall caches the GGUF conversion in (what transformers loads for the peft configs)."""
    from holdall.models.loading import gguf_cache_dir, resolve_model

    return gguf_cache_dir(resolve_model("smollm2").path)


def ensure_hf_dir() -> Path:
    directory = hf_dir()
    if not ((directory / "config.json").is_file() and (directory / "model.safetensors").is_file()):
        from holdall.models import load_model

        load_model("smollm2")  # converts the GGUF once and fills the cache
    return directory


def rss_now_gib() -> float:
    """Current VmRSS of this process (GiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --- peft (+ bitsandbytes) ----------------------------------------------------------------------------------------
def peft_model(qlora: bool):
    """The anchor's setup, loading the same fp32 weights from holdall's HF cache of the GGUF."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(hf_dir(), quantization_config=quant, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir(), dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def run_peft(qlora: bool, steps: int, warmup: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir())
    windows = training_windows(tokenizer, steps + warmup)
    model = peft_model(qlora)
    rss_ready = rss_now_gib()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times, losses = [], []
    for i in range(steps + warmup):
        window = windows[i % len(windows)]
        ids = torch.tensor([window.input_ids])
        labels = torch.tensor([window.labels])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=qlora):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"step_times": times, "losses": losses, "rss_ready_GiB": rss_ready}


# --- holdall ------------------------------------------------------------------------------------------------------
def run_holdall(method: str, compute: str, fast: bool, steps: int, warmup: int) -> dict:
    """finetune()'s path: load_model -> prepare_model -> Trainer.train, on pre-packed full windows."""
    from holdall.models import load_model
    from holdall.training import FinetuneConfig, Trainer, prepare_model
    from holdall.training.finetune import autocast_dtype, pick_compute_dtype

    config = FinetuneConfig(
        method=method, r=R, alpha=ALPHA, dropout=DROPOUT, targets="all-linear", lr=LR, max_steps=steps + warmup,
        warmup=0, schedule="constant", optimizer="adamw", max_len=SEQ, gradient_checkpointing=True,
        device="cpu", progress=False, log_every=1, compute_dtype=compute, fast_step=fast,
    )
    dtype = pick_compute_dtype(config.compute_dtype, torch.device("cpu"))  # bf16 where the CPU has native bf16
    torch.manual_seed(config.seed)
    model, tokenizer = load_model("smollm2", dtype=dtype, device="cpu")
    windows = training_windows(tokenizer, steps + warmup)
    prepare_model(model, config.method, config.lora_config(), config.gradient_checkpointing)
    rss_ready = rss_now_gib()
    with tempfile.TemporaryDirectory(prefix="holdall-speed-") as out:
        autocast = autocast_dtype(model, dtype, config.method)
        trainer = Trainer(model, windows, None, config.trainer_config(autocast), out,
                          pad_id=tokenizer.eos_token_id, save_model=None)
        result = trainer.train()
    records = [r for r in result.history if "loss" in r]
    return {"step_times": step_times_from_metrics(records), "losses": [r["loss"] for r in records],
            "rss_ready_GiB": rss_ready}


def step_times_from_metrics(records: list[dict]) -> list[float]:
    """Per-step seconds from the trainer's log: elapsed after step k = cumulative tokens / tokens_per_s."""
    elapsed, cumulative = [], 0
    for record in records:
        cumulative += record["tokens"]
        elapsed.append(cumulative / record["tokens_per_s"])
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]


# --- one configuration per process --------------------------------------------------------------------------------
def worker(config: str, steps: int, warmup: int, threads: int, out: Path) -> None:
    torch.set_num_threads(threads)
    if config.startswith("peft"):
        raw = run_peft(qlora=(config == "peft-bnb-qlora"), steps=steps, warmup=warmup)
    else:
        raw = run_holdall(*HOLDALL[config], steps, warmup)
    timed = raw["step_times"][warmup:]
    median = statistics.median(timed)
    result = {
        "config": config, "steps": steps, "warmup": warmup,
        "step_s": round(median, 3), "tokens_per_s": round(SEQ / median, 1),
        "step_times_s": [round(t, 3) for t in raw["step_times"]],
        "loss": round(raw["losses"][-1], 4), "losses": [round(x, 4) for x in raw["losses"]],
        "max_rss_GiB": round(max_rss_gib(), 3), "rss_ready_GiB": round(raw["rss_ready_GiB"], 3),
        "rss_end_GiB": round(rss_now_gib(), 3),
    }
    out.write_text(json.dumps(result))


def run_config(config: str, steps: int, warmup: int, threads: int) -> dict:
    """Run one configuration in a fresh interpreter; its JSON result, or the error it died with."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", config, "--steps", str(steps), "--warmup", str(warmup),
               "--threads", str(threads), "--worker-out", str(out)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not out.is_file():
            return {"config": config, "error": (proc.stderr or proc.stdout)[-3000:], "wall_s": round(wall, 1)}
        result = json.loads(out.read_text())
    result["wall_s"] = round(wall, 1)
    return result


# --- the report -----------------------------------------------------------------------------------------------------
def combine_rounds(runs: list[dict]) -> dict:
    """One configuration over several rounds: the median round (by step time), with every round's tokens/s."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["step_s"])
    chosen = dict(ok[len(ok) // 2])
    chosen["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs if "error" not in r]
    chosen["max_rss_GiB"] = max(r["max_rss_GiB"] for r in ok)
    return chosen


def machine(threads: int) -> dict:
    import importlib.metadata as md

    from machine_info import cpu_name

    cpu = cpu_name()
    versions = {}
    for pkg in ("transformers", "peft", "bitsandbytes", "holdall"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "threads": threads, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg()), **versions}


def ratios(results: dict) -> dict:
    """tokens/s and peak-RSS ratios of each holdall configuration to peft LoRA (speed > 1: holdall faster)."""
    base = results.get(BASELINE)
    out = {}
    if not base or "error" in base:
        return out
    for config in ("holdall-qlora", "holdall-qlora-fp32", "holdall-lora", "holdall-lora-fast", "holdall-qlora-fast",
                   "peft-bnb-qlora"):
        run = results.get(config)
        if run and "error" not in run:
            out[f"{config} / {BASELINE}"] = {
                "tokens_per_s": round(run["tokens_per_s"] / base["tokens_per_s"], 3),
                "step_s": round(run["step_s"] / base["step_s"], 3),
                "max_rss": round(run["max_rss_GiB"] / base["max_rss_GiB"], 3),
            }
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# LoRA / QLoRA training speed on CPU: holdall vs transformers + peft (+ bitsandbytes)",
        "",
        f"SmolLM2-135M-Instruct fp32, seq {SEQ}, batch 1, r={R} alpha {ALPHA} dropout {DROPOUT} on all 7 linears, "
        f"gradient checkpointing, AdamW lr 1e-4; each configuration in its own process, {len(report['rounds'])} "
        "rounds in rotating order, the median round reported.",
        f"Machine: {m['cpu']}, {m['threads']} threads (of {m['logical_cpus']} logical CPUs), torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.",
        "",
        "| configuration | timed steps (warm-up) | median step s | tokens/s | tokens/s per round | max RSS GiB | RSS ready GiB | last loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, run in report["results"].items():
        if "error" in run:
            lines.append(f"| {config} | failed: {run['error'].strip().splitlines()[-1][:120]} | | | | | | |")
        else:
            rounds = ", ".join(str(x) for x in run.get("tokens_per_s_rounds", [run["tokens_per_s"]]))
            lines.append(f"| {config} | {run['steps']} ({run['warmup']}) | {run['step_s']} | {run['tokens_per_s']} | "
                         f"{rounds} | {run['max_rss_GiB']} | {run['rss_ready_GiB']} | {run['loss']} |")
    if report["ratios"]:
        lines += ["", "| ratio | tokens/s | step time | max RSS |", "|---|---|---|---|"]
        for name, r in report["ratios"].items():
            lines.append(f"| {name} | {r['tokens_per_s']} | {r['step_s']} | {r['max_rss']} |")
    lines += ["", "RSS ready: resident memory once the model is loaded and prepared, before the first step. "
              "Max RSS includes loading (holdall QLoRA quantizes an fp32 load, as finetune does)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per configuration")
    p.add_argument("--bnb-steps", type=int, default=2, help="timed steps for peft-bnb-qlora (~100 s each)")
    p.add_argument("--bnb-warmup", type=int, default=1)
    p.add_argument("--skip-bnb-qlora", action="store_true", help="leave out the slow bitsandbytes configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat the whole set this many times, rotating the order (machine drift hits every "
                        "configuration alike); each configuration reports the median over rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.bnb_steps < 1 or args.bnb_warmup < 0:
        p.error("--steps/--bnb-steps must be >= 1 and --warmup/--bnb-warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.threads, args.worker_out)
        return
    configs = [c for c in args.configs.split(",") if c]
    if args.skip_bnb_qlora:
        configs = [c for c in configs if c != "peft-bnb-qlora"]
    ensure_hf_dir()  # convert the GGUF once, before any timed process
    report = {"machine": machine(args.threads), "seq_len": SEQ, "rounds": [], "results": {}}
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        order = configs[shift:] + configs[:shift]  # rotate, so no configuration always runs first or last
        runs = {}
        for config in order:
            steps, warmup = (args.bnb_steps, args.bnb_warmup) if config == "peft-bnb-qlora" else (args.steps, args.warmup)
            print(f"round {round_index + 1}/{args.rounds} {config}: {warmup} warm-up + {steps} timed steps ...", flush=True)
            run = run_config(config, steps, warmup, args.threads)
            runs[config] = run
            if "error" in run:
                print(f"  FAILED:\n{run['error']}", flush=True)
            else:
                print(f"  {run['step_s']} s/step, {run['tokens_per_s']} tok/s, max RSS {run['max_rss_GiB']} GiB, "
                      f"loss {run['loss']} (process wall {run['wall_s']} s)", flush=True)
        report["rounds"].append(runs)
    report["results"] = {config: combine_rounds([r[config] for r in report["rounds"]]) for config in configs}
    report["ratios"] = ratios(report["results"])
    for name, r in report["ratios"].items():
        print(f"{name}: tokens/s x{r['tokens_per_s']}, max RSS x{r['max_rss']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_cpu_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "lora_cpu_speed.md").write_text(markdown(report))
    print(f"wrote {args.out / 'lora_cpu_speed.json'} and .md")


if __name__ == "__main__":
    main()
