"""Loopback load test of ``holdall serve``: many clients, several adapters and the base, one server.

One base (default: the alias ``smollm2``, SmolLM2-135M-Instruct in fp32) with N LoRA adapters (default 3, made
here: ``add_lora`` r=16 on every decoder linear with a random, seeded B, saved in the PEFT format and loaded back
by the engine as ``holdall serve --adapter`` would; or real ones with ``--adapter name=path``). The workload is a
fixed list of chat requests, round-robin over the base and the adapters, each adapter asked its own customer's
instructions from ``holdall/data/customers`` (greedy, ``max_tokens`` fixed, EOS may end a request earlier).

Three phases run the same requests against a fresh server (same process, 127.0.0.1, streamed SSE):

* ``solo``     one request at a time (concurrency 1): the reference answer of every request, and the number
               a server without any batching reaches;
* ``mixed``    ``--concurrency`` clients; rows of different adapters share each forward pass (the default);
* ``unmixed``  the same clients; the engine batches only requests for the same adapter
               (``--no-mixed-batches``): what a server without per-row adapters can do at best.

Checked: every greedy answer of ``mixed`` and ``unmixed`` equals the same request's ``solo`` answer (mismatches
are listed: float rounding of different batch shapes can flip a near-tied argmax on a real model), and no
request is lost (every one sent gets a complete answer). Recorded: completion tokens/s, requests/s, latency
and time to first token (p50 / p99), the largest batch and how many passes mixed adapters; printed: the
mixed / unmixed throughput ratio.

Usage:
    python benchmarks/serve_load.py                                    # 48 requests x 3 phases, a few minutes
    python benchmarks/serve_load.py --requests 4 --concurrency 4 --max-tokens 4 --out /tmp/serve_dry   # dry run
    python benchmarks/serve_load.py --adapter client-a=out/client-a --adapter client-b=out/client-b
Writes benchmarks/results/serve_load.{json,md} (or --out). The numbers are wall-clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from machine_info import cpu_name  # noqa: E402

CUSTOMER_FILES = ("client_a_medical.jsonl", "client_b_legal.jsonl", "client_c_support_es.jsonl")
PHASES = ("solo", "mixed", "unmixed")


# --- setup --------------------------------------------------------------------------------------------------------
def make_random_adapters(model, n: int, rank: int, out_dir: Path) -> dict[str, str]:
    """``n`` adapters with random (seeded) B, saved in the PEFT format, then removed from ``model`` again.

    B = 0 (a fresh adapter) would leave the output unchanged; a random B of this size changes the greedy
    output without turning it into noise, which is all a load test needs.
    """
    from holdall.tuners.lora import LoraConfig, add_lora, delete_adapter, lora_layers, save_adapter

    paths = {}
    for i in range(n):
        name = f"adapter-{i + 1}"
        add_lora(model, LoraConfig(r=rank, alpha=2 * rank, dropout=0.0), name)
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora_B:
                    weight = layer.lora_B[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
        paths[name] = str(save_adapter(model, out_dir / name, name))
        delete_adapter(model, name)  # the engine loads it back from disk, as `holdall serve --adapter` does
    return paths


def customer_prompts() -> list[list[str]]:
    """Each customer's instructions (with their input, if any), one list per customer."""
    from holdall.data import DATA_DIR

    prompts = []
    for name in CUSTOMER_FILES:
        path = DATA_DIR / "customers" / name
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        prompts.append([r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in rows])
    return prompts


def workload(models: list[str], n: int) -> list[tuple[str, str]]:
    """``n`` (model, prompt) pairs, round-robin over the models; adapter i gets customer i's prompts."""
    by_customer = customer_prompts()
    jobs = []
    for i in range(n):
        slot = i % len(models)
        turn = i // len(models)
        # the base (slot 0) gets every customer in turn; adapter k gets customer (k - 1) mod 3
        customer = turn % len(by_customer) if slot == 0 else (slot - 1) % len(by_customer)
        prompts = by_customer[customer]
        jobs.append((models[slot], prompts[turn % len(prompts)]))
    return jobs


# --- one phase ----------------------------------------------------------------------------------------------------
def stream_one(client, url: str, key: str | None, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: its text, finish reason, token count, latency and time to first token."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first = None
    parts, finish, tokens, error = [], None, 0, None
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {response.read().decode()[:200]}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
                finish = choice["finish_reason"] or finish
    end = time.perf_counter()
    return {"text": "".join(parts), "finish_reason": finish, "completion_tokens": tokens, "error": error,
            "latency_s": end - start, "ttft_s": (first or end) - start}


def run_phase(engine, base_name: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int,
              time_cap: float) -> dict:
    """Serve ``jobs`` with ``concurrency`` client threads; stop sending new ones after ``time_cap`` seconds."""
    import httpx

    from holdall.serving import ServeConfig
    from holdall.serving.app import create_app
    from holdall.serving.server import start_in_thread

    app = create_app(engine, ServeConfig(engine=engine.config), base_name)
    results: list[dict | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    lock = threading.Lock()
    with start_in_thread(app) as server:
        with httpx.Client() as client:  # one untimed request per model: first-call costs stay out of the numbers
            for model in dict.fromkeys(m for m, _ in jobs):
                stream_one(client, server.url, None, model, jobs[0][1], 1)
        start = time.perf_counter()
        deadline = start + time_cap

        def worker() -> None:
            with httpx.Client() as client:
                while time.perf_counter() < deadline:
                    with lock:
                        i = next(next_job, None)
                    if i is None:
                        return
                    model, prompt = jobs[i]
                    try:
                        results[i] = stream_one(client, server.url, None, model, prompt, max_tokens)
                    except Exception as exc:  # recorded as a failed request, never a silently lost one
                        results[i] = {"error": f"{type(exc).__name__}: {exc}"}

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    return summarize(results, wall, engine.stats.to_dict())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def summarize(results: list[dict | None], wall: float, stats: dict) -> dict:
    done = [r for r in results if r is not None and r.get("error") is None]
    failed = [r for r in results if r is not None and r.get("error") is not None]
    tokens = sum(r["completion_tokens"] for r in done)
    latencies = [r["latency_s"] for r in done]
    ttfts = [r["ttft_s"] for r in done]
    return {
        "sent": sum(r is not None for r in results), "completed": len(done), "failed": len(failed),
        "not_sent_time_cap": sum(r is None for r in results),
        "errors": [r["error"] for r in failed][:5],
        "wall_s": wall, "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None, "requests_per_s": len(done) / wall if wall else None,
        "latency_p50_s": _percentile(latencies, 50), "latency_p99_s": _percentile(latencies, 99),
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "engine": stats, "outputs": [None if r is None else r.get("text") for r in results],
        "finish_reasons": [None if r is None else r.get("finish_reason") for r in results],
    }


def compare(reference: dict, other: dict, jobs: list[tuple[str, str]]) -> list[dict]:
    """Requests whose answer differs from the solo answer (both answered)."""
    mismatches = []
    for i, (solo, text) in enumerate(zip(reference["outputs"], other["outputs"])):
        if solo is not None and text is not None and solo != text:
            mismatches.append({"request": i, "model": jobs[i][0], "solo": solo[:120], "batched": text[:120]})
    return mismatches


# --- reporting ----------------------------------------------------------------------------------------------------
def markdown(record: dict) -> str:
    cfg = record["config"]
    lines = [
        "# holdall serve: loopback load test",
        "",
        f"{record['machine']['cpu']}, {record['machine']['threads']} torch threads, "
        f"torch {record['machine']['torch']}, "
        f"device {cfg['device']}, {cfg['dtype']}. Base `{cfg['model']}` + {len(cfg['adapters'])} adapters "
        f"({', '.join(cfg['adapters'])}); {cfg['requests']} chat requests round-robin over the base and the adapters, "
        f"greedy, max_tokens {cfg['max_tokens']}, {cfg['concurrency']} concurrent clients, max batch "
        f"{cfg['max_batch']}, time cap {cfg['time_cap_s']} s per phase. Same process, 127.0.0.1, streamed SSE.",
        "",
        "| phase | sent | completed | failed | tokens/s | requests/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) "
        "| max batch | mixed passes | answers equal to solo |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        p = record["phases"][phase]
        equal = "reference" if phase == "solo" else f"{p['completed'] - len(p['mismatches'])} / {p['completed']}"
        lines.append(
            f"| {phase} | {p['sent']} | {p['completed']} | {p['failed']} | {p['tokens_per_s']:.1f} | "
            f"{p['requests_per_s']:.2f} | {_fmt(p['latency_p50_s'])} / {_fmt(p['latency_p99_s'])} | "
            f"{_fmt(p['ttft_p50_s'])} / {_fmt(p['ttft_p99_s'])} | {p['engine']['max_batch_seen']} | "
            f"{p['engine']['mixed_steps']} | {equal} |"
        )
    lines += ["", f"**mixed / unmixed throughput: {record['mixed_over_unmixed']:.2f}x**; "
                  f"mixed / solo: {record['mixed_over_solo']:.2f}x.", ""]
    for phase in ("mixed", "unmixed"):
        for m in record["phases"][phase]["mismatches"][:5]:
            lines.append(f"* {phase} request {m['request']} ({m['model']}): solo {m['solo']!r} vs {m['batched']!r}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def random_base(preset_name: str, tokenizer_source: str, dtype: torch.dtype, device: str):
    """A randomly initialised causal LM of a planning preset's architecture (e.g. Llama-2-7B), built directly on
    ``device``, with the vocabulary of ``tokenizer_source``'s tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from holdall.errors import ConfigError
    from holdall.models.loading import load_tokenizer
    from holdall.planning.presets import get_preset

    preset = get_preset(preset_name)
    if preset is None:
        raise ConfigError(f"unknown preset {preset_name!r}; `holdall plan --help` lists them")
    if Path(tokenizer_source).is_dir() and not (Path(tokenizer_source) / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)  # a tokenizer-only folder
    else:
        tokenizer = load_tokenizer(tokenizer_source)
    fields = {k: v for k, v in preset.items() if k not in ("name", "model_type", "source", "nominal_params")}
    config = AutoConfig.for_model(preset["model_type"], **fields)
    config.vocab_size = len(tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve these adapters instead of making random ones")
    parser.add_argument("--n-adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--time-cap", type=float, default=300.0, help="seconds per phase before sending stops")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-base", metavar="PRESET",
                        help="serve a random-weight model of this architecture preset (e.g. llama-2-7b, see "
                        "`holdall plan`) with --model's tokenizer: a large base with nothing to download")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from holdall.models.loading import load_model
    from holdall.serving import Engine, EngineConfig
    from holdall.serving.server import parse_adapter_specs

    if args.random_base:
        model, tokenizer = random_base(args.random_base, args.model, getattr(torch, args.dtype), args.device)
    else:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = parse_adapter_specs(args.adapter) or make_random_adapters(model, args.n_adapters, args.rank,
                                                                             Path(tmp))
        models = [args.model, *adapters]
        jobs = workload(models, args.requests)
        phases = {}
        loaded = False
        for phase in PHASES:
            config = EngineConfig(max_batch_size=args.max_batch, max_new_tokens=max(args.max_tokens, 1),
                                  max_queued_requests=max(256, args.requests), mixed_batches=phase != "unmixed")
            engine = Engine(model, tokenizer, config)
            if not loaded:  # loaded once into the shared model; later engines adopt them
                for name, path in adapters.items():
                    engine.load_adapter(name, path)
                loaded = True
            concurrency = 1 if phase == "solo" else args.concurrency
            print(f"{phase}: {len(jobs)} requests, concurrency {concurrency} ...", flush=True)
            phases[phase] = run_phase(engine, args.model, jobs, concurrency, args.max_tokens, args.time_cap)
            print(f"  {phases[phase]['completed']} completed, {phases[phase]['tokens_per_s']:.1f} tokens/s, "
                  f"p50 {_fmt(phases[phase]['latency_p50_s'])} s", flush=True)
    for phase in PHASES:
        phases[phase]["mismatches"] = [] if phase == "solo" else compare(phases["solo"], phases[phase], jobs)
    record = {
        "config": {"model": f"random {args.random_base}" if args.random_base else args.model, "adapters": list(adapters), "rank": args.rank, "requests": args.requests,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                   "time_cap_s": args.time_cap, "dtype": args.dtype, "device": args.device},
        "machine": {"cpu": cpu_name(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "phases": phases,
        "mixed_over_unmixed": phases["mixed"]["tokens_per_s"] / phases["unmixed"]["tokens_per_s"],
        "mixed_over_solo": phases["mixed"]["tokens_per_s"] / phases["solo"]["tokens_per_s"],
    }
    # a request the time cap kept from being sent is not lost (the cap bounds the run); one sent and unanswered is
    lost = sum(p["sent"] - p["completed"] for p in phases.values())
    unsent = sum(p["not_sent_time_cap"] for p in phases.values())
    mismatched = sum(len(p["mismatches"]) for p in phases.values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "serve_load.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {args.out / 'serve_load.json'} and serve_load.md; lost {lost}, mismatched {mismatched}, "
          f"not sent (time cap) {unsent}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
