"""QLoRA training step on a Llama-2-7B-shaped model: the Hugging Face stack and holdall's fused step, one process.

The HF stack is ``../shared/anchors/gpu_hf_stack.py``'s recipe: bf16 random weights (N(0, 0.02)), bitsandbytes NF4 +
double quant (``Linear4bit``/``Params4bit``, the layers ``from_pretrained(BitsAndBytesConfig)`` builds),
``prepare_model_for_kbit_training`` (which upcasts the embedding, norms and lm_head to float32, as it does after
``from_pretrained``), peft LoRA r=16 alpha 32 dropout 0.05 on all seven decoder linears, reentrant gradient
checkpointing, bf16 autocast, bitsandbytes PagedAdamW8bit lr 1e-4. holdall: the same bf16 weights quantized by
``training.prepare_model(method="qlora")`` (NF4 + double quant, blocks of 64), the same LoRA settings, its fused
step (``training.fast_step``; eager, eager with checkpoints offloaded to CPU, or replayed as CUDA graphs) and its
fused 8-bit AdamW, paged like the HF stack's (``FusedAdamW8bit(paged=True)``: states in pinned CPU memory,
each bucket's on the device only for its update; ``--unpaged`` keeps them on the device). Batch 1 x ``--seq``
random tokens (labels = inputs), median of ``--steps`` timed steps after ``--warmup``; peak memory is
``torch.cuda.max_memory_allocated`` from the first step on, and ``step_peaks_GiB`` each step's own peak (the
first step compiles and, with CUDA graphs, captures). bitsandbytes' paged states are CUDA managed memory, outside
torch's allocator: not counted.

``--longest 131072,262144,...``: one holdall step (offload "auto") at each length, peak memory and time; the HF
stack's limit is its anchor's (~84k tokens on an 80 GB card: ``gpu_hf_seqlen.py``).

Usage (device machine, bitsandbytes wheel carried):
    python bench/gpu_qlora_step.py [--layers 32] [--seq 2048] [--configs hf,holdall,holdall-offload]
Writes qlora_step.json into $OUT (or --out); ``--memory-profile`` adds what is alive at each config's peak
(``memory_peak.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4


def make_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def build_hf(layers: int):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = make_model(layers)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", compress_statistics=True, device="meta")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to("cuda")
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what from_pretrained(BitsAndBytesConfig) sets: prepare_model_for_kbit_training
    model.is_quantized = True       # then upcasts every non-4-bit parameter to float32, as in the anchor
    gc.collect()
    torch.cuda.empty_cache()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none",
                                             task_type="CAUSAL_LM", target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=LR)

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step, sum(p.numel() for p in params)


def build_holdall(layers: int, offload: str, mlp_chunk: int | None = None, budget: float | None = None,
                  graphs: bool = False, paged: bool = True):
    from holdall.training.fast_step import FastStep, FastStepConfig
    from holdall.training.optim import FusedAdamW8bit
    from holdall.training.qlora import prepare_model
    from holdall.tuners.lora import LoraConfig

    model = make_model(layers)
    t = time.perf_counter()
    prepare_model(model, "qlora", LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=tuple(TARGETS)),
                  gradient_checkpointing=False)
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t
    gc.collect()
    torch.cuda.empty_cache()
    fast = FastStep(model, FastStepConfig(offload=offload, mlp_chunk=mlp_chunk, memory_budget_gib=budget,
                                               cuda_graphs=graphs))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = FusedAdamW8bit(params, lr=LR, weight_decay=0.0, paged=paged)

    def step(x):
        loss = fast(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.fast = fast
    step.quantize_s = quantize_s
    return model, step, sum(p.numel() for p in params)


def timed(step, seq: int, steps: int, warmup: int, profile: Path | None = None) -> dict:
    x = torch.randint(0, 32000, (1, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if profile is not None:  # every allocation from the first step on, with its Python stack
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        base = torch.cuda.memory_allocated()
    times, losses, peaks, reserved = [], [], [], []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # this step's own peak next
        t = time.perf_counter()
        loss = step(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        peaks.append(torch.cuda.max_memory_allocated())
        reserved.append(torch.cuda.max_memory_reserved())
    med = statistics.median(times[warmup:])
    if profile is not None:
        from memory_peak import peak_report

        report = peak_report(torch.cuda.memory._snapshot(), base)
        torch.cuda.memory._record_memory_history(enabled=None)
        profile.write_text(report + "\n")
        print(report, flush=True)
    return {"step_s": round(med, 4), "tokens_per_s": round(seq / med, 1),
            "peak_GiB": round(max(peaks) / 2**30, 3), "step_peaks_GiB": [round(v / 2**30, 3) for v in peaks],
            "peak_reserved_GiB": round(max(reserved) / 2**30, 3),
            "first_step_s": round(times[0], 2), "losses": [round(v, 4) for v in losses]}


def free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", default="hf,holdall,holdall-offload,holdall-graphs,holdall-graphs-offload")
    ap.add_argument("--longest", default="", help="comma-separated sequence lengths for one holdall step each")
    ap.add_argument("--mlp-chunk", type=int, default=None)
    ap.add_argument("--unpaged", action="store_true", help="holdall's optimizer states on the device (not paged)")
    ap.add_argument("--card-gib", type=float, default=78.0,
                    help="--longest runs as if the card had this much memory (an 80 GB H100 has ~78 GiB usable)")
    ap.add_argument("--memory-profile", action="store_true",
                    help="record every allocation of each config's steps; write what is alive at the peak to "
                         "memory_peak_<config>.txt")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
               "seq": args.seq, "date": time.strftime("%Y-%m-%d")}

    def log(key, value):
        results[key] = value
        print(key, json.dumps(value), flush=True)
        (out / "qlora_step.json").write_text(json.dumps(results, indent=1))

    for config in [c for c in args.configs.split(",") if c]:
        if config == "hf":
            model, step, n = build_hf(args.layers)
        else:
            offload = {"holdall": "none", "holdall-offload": "cpu", "holdall-graphs": "none",
                       "holdall-graphs-offload": "cpu"}[config]
            model, step, n = build_holdall(args.layers, offload, args.mlp_chunk, graphs="graphs" in config,
                                           paged=not args.unpaged)
        profile = out / f"memory_peak_{config}.txt" if args.memory_profile else None
        record = {"trainable": n, **timed(step, args.seq, args.steps, args.warmup, profile)}
        if hasattr(step, "quantize_s"):
            record["quantize_s"] = round(step.quantize_s, 1)
        log(config, record)
        del model, step
        free()
    if "hf" in results:
        for config in ("holdall", "holdall-offload", "holdall-graphs", "holdall-graphs-offload"):
            if config in results:
                log(f"{config}_vs_hf", {
                    "speed": round(results[config]["tokens_per_s"] / results["hf"]["tokens_per_s"], 3),
                    "memory": round(results[config]["peak_GiB"] / results["hf"]["peak_GiB"], 3)})
    if args.longest:
        total = torch.cuda.get_device_properties(0).total_memory
        if args.card_gib * 2**30 < total:
            torch.cuda.set_per_process_memory_fraction(args.card_gib * 2**30 / total)
        log("card_GiB", args.card_gib)
        model, step, _ = build_holdall(args.layers, "auto", args.mlp_chunk, budget=args.card_gib)
        for seq in [int(s) for s in args.longest.split(",")]:
            try:
                record = timed(step, seq, steps=1, warmup=0)
                record["checkpoints_on_device"] = step.fast.last_on_device
            except torch.OutOfMemoryError as exc:
                record = {"oom": str(exc).splitlines()[0][:200]}
                gc.collect()
                torch.cuda.empty_cache()
            log(f"longest_{seq}", record)


if __name__ == "__main__":
    main()
