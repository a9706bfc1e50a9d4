"""LoRA / QLoRA training-step speed and peak GPU memory: holdall beside transformers + peft + bitsandbytes.

The GPU half of the LoRA speed table (the CPU half is lora_cpu_speed.py). Small models with random weights
(speed and memory do not depend on the values): SmolLM2-135M's and SmolLM2-1.7B's shapes, bf16 base, batch 1,
LoRA r=16 alpha 32 dropout 0.05 on all 7 decoder linears, gradient checkpointing, bf16 autocast, paged 8-bit
AdamW, the loop of ../shared/anchors/gpu_hf_stack.py. Four configurations, one model each, in turn:

* peft-lora        transformers + peft on the bf16 base (reentrant checkpointing, as the anchor);
* peft-bnb-qlora   transformers from_pretrained(BitsAndBytesConfig nf4 + double quant, bf16 compute),
                   prepare_model_for_kbit_training, peft, bitsandbytes PagedAdamW8bit;
* holdall-lora     holdall.load_model + holdall.training.prepare_model (what finetune runs), holdall PagedAdamW8bit;
* holdall-qlora    the same with method "qlora" (NF4 + double quant base quantized by holdall).

Every configuration trains on the same random token batch with the same timing loop (synchronised, median of the
timed steps). Usage on a GPU machine (bitsandbytes importable):
    python benchmarks/lora_gpu_speed.py [--shapes smollm2-135m smollm2-1.7b] [--seq 2048] [--steps 6] [--warmup 2]
Writes lora_gpu_speed.json and .md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
SHAPES = {  # published SmolLM2 configs (tied embeddings)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152),
}
CONFIGS = ("peft-lora", "peft-bnb-qlora", "holdall-lora", "holdall-qlora")


def save_random_model(shape: str, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    model.save_pretrained(directory)


def build(config: str, directory: Path, holdall_optimizer: str = "paged_adamw8bit"):
    """(model, optimizer) for one configuration, on the GPU."""
    if config.startswith("peft"):
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if config == "peft-bnb-qlora":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
            model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cuda")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
        optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=LR)
    else:
        from holdall.models import load_model
        from holdall.training import prepare_model
        from holdall.training.optim import build_optimizer
        from holdall.tuners.lora import LoraConfig

        model, _ = load_model(directory, dtype=torch.bfloat16, device="cuda")
        prepare_model(model, config.split("-", 1)[1], LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"))
        optimizer = build_optimizer(holdall_optimizer, [p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    return model, optimizer


def time_steps(model, optimizer, ids: torch.Tensor, steps: int, warmup: int) -> tuple[list[float], float]:
    times, loss = [], None
    for _ in range(steps + warmup):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[warmup:], float(loss)


def run_config(config: str, directory: Path, vocab: int, seq: int, steps: int, warmup: int,
               holdall_optimizer: str = "paged_adamw8bit") -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, optimizer = build(config, directory, holdall_optimizer)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0)).cuda()
    times, loss = time_steps(model, optimizer, ids, steps, warmup)
    median = statistics.median(times)
    result = {"config": config, "step_s": round(median, 4), "tokens_per_s": round(seq / median, 1),
              "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3), "loss": round(loss, 4),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--holdall-optimizers", nargs="+", default=["paged_adamw8bit"],
                        help="holdall optimizers to run (each gives a holdall row): adamw adamw8bit paged_adamw8bit")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "transformers": transformers.__version__, "seq": args.seq, "batch": 1, "steps": args.steps,
            "warmup": args.warmup, "date": time.strftime("%Y-%m-%d")}
    rows = []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory(prefix=f"{shape}-") as tmp:
            save_random_model(shape, Path(tmp))
            for config in args.configs:
                optimizers = args.holdall_optimizers if config.startswith("holdall") else ["bnb paged_adamw8bit"]
                for optimizer in optimizers:
                    row = {"shape": shape, **run_config(config, Path(tmp), SHAPES[shape]["vocab_size"], args.seq,
                                                        args.steps, args.warmup, optimizer), "optimizer": optimizer}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    (out / "lora_gpu_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "lora_gpu_speed.md").write_text(render(meta, rows))
    print(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}; batch 1 x seq "
             f"{meta['seq']}, median of {meta['steps']} steps after {meta['warmup']} warm-up; {meta['date']}.", "",
             "| model shape | configuration | optimizer | tokens/s | step s | peak GiB | vs peft LoRA (speed) | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["config"] == "peft-lora")
        lines.append(f"| {row['shape']} | {row['config']} | {row['optimizer']} | {row['tokens_per_s']:.0f} | {row['step_s']:.4f} | "
                     f"{row['peak_GiB']:.2f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x | {row['loss']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
