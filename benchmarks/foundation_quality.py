"""Quality and size of holdall's round-to-nearest formats on SmolLM2-135M, beside bitsandbytes, in one run.

For the base model (SmolLM2-135M-Instruct dequantized from the packaged Q4_1 GGUF to fp32) and each
holdall format — int8, int4 g128 sym/asym, int3 g128, NF4, NF4 + double quant — this measures on the
WikiText-2 test split (GPTQ/AWQ protocol: the text tokenized once, non-overlapping windows):

* perplexity,
* mean token-level KL(base || quantized) and top-1 agreement on the same windows (base logits computed once
  per window and shared by every variant),
* the bytes of the quantized linear weights (packed codes + scales + zeros), the whole model's bytes and
  bits per weight of the quantized layers.

The incumbent is measured in the same run on the same windows: bitsandbytes' NF4 (with and without double
quantization) applied to the same float weights through its own `Linear4bit` modules (CPU backend).
Note: bitsandbytes 0.50's CPU backend repacks a Linear4bit for its own kernel when the module is put in
eval mode (as every evaluation does) and then computes with bf16 weights; its codes are byte-identical to
holdall's (tests/test_core_codebook.py), so any perplexity gap between the two NF4 rows comes from that bf16
inference path, not from the quantization.

Usage:  python benchmarks/foundation_quality.py [--windows 40] [--seq-len 2048] [--out benchmarks/results]
Writes foundation_quality.json, foundation_quality.md (the table pasted into BENCHMARKS.md) and
foundation_quality.png (perplexity vs size).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import holdall
from holdall.algorithms import quantize
from holdall.algorithms.config import QuantConfig
from holdall.core.linear import QuantLinear
from holdall.data import wikitext2
from holdall.evaluation.perplexity import evaluate_many
from holdall.evaluation.text import load_text
from machine_info import cpu_name  # benchmarks/ is on sys.path when a benchmark runs as a script

VARIANTS = {
    "int8 g128 sym": QuantConfig.for_method("rtn", bits=8, group_size=128),
    "int4 g128 sym": QuantConfig.for_method("rtn", bits=4, group_size=128),
    "int4 g128 asym": QuantConfig.for_method("rtn", bits=4, group_size=128, symmetric=False),
    "int3 g128 sym": QuantConfig.for_method("rtn", bits=3, group_size=128),
    "int3 g128 asym": QuantConfig.for_method("rtn", bits=3, group_size=128, symmetric=False),
    "nf4 b64": QuantConfig.for_method("nf4"),
    "nf4 b64 + dq": QuantConfig.for_method("nf4", double_quant=True),
}


def linear_weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, numel) of the weights of every decoder linear, packed or float."""
    total_bytes = total_numel = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total_bytes += module.nbytes
            total_numel += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
            total_bytes += module.weight.numel() * module.weight.element_size()
            total_numel += module.weight.numel()
    return total_bytes, total_numel


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bnb_nf4(model: torch.nn.Module, double_quant: bool) -> torch.nn.Module:
    """The incumbent: bitsandbytes Linear4bit (NF4, block 64) on the same decoder linears, fp32 compute."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=double_quant,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
            )
            q = q.to("cpu")  # quantizes on the first .to(); the CPU backend does the rest
            setattr(module, child_name, q)
    return model


def bnb_quant_state_bytes(module) -> int:
    """Bytes of a Linear4bit's quantization constants, which bitsandbytes keeps outside parameters/buffers."""
    state = module.weight.quant_state
    nbytes = state.absmax.numel() * state.absmax.element_size()
    if state.nested and state.state2 is not None:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
    return nbytes


def bnb_linear_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(linear bytes, linear numel, bytes of quant constants not visible to model.parameters/buffers)."""
    import bitsandbytes as bnb

    total_bytes = total_numel = hidden = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            extra = bnb_quant_state_bytes(module)
            total_bytes += module.weight.data.numel() * module.weight.data.element_size() + extra
            total_numel += module.in_features * module.out_features
            hidden += extra
    return total_bytes, total_numel, hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=16, help="2048-token windows of WikiText-2 test to score")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--skip-bnb", action="store_true", help="leave out the bitsandbytes incumbent")
    parser.add_argument("--replot", action="store_true", help="redraw table and plot from the saved JSON only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((out / "foundation_quality.json").read_text())
        (out / "foundation_quality.md").write_text(render_markdown(saved["meta"], saved["rows"]))
        plot(saved["rows"], out / "foundation_quality.png")
        return

    base, tokenizer = holdall.load_model(args.model, dtype=torch.float32)
    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict] = {}
    base_bytes, base_numel = linear_weight_bytes(base)
    rows["base fp32"] = {"tool": "-", "linear_bytes": base_bytes, "model_bytes": model_bytes(base), "quantize_s": 0.0}
    for label, config in VARIANTS.items():
        start = time.perf_counter()
        qmodel = quantize(copy.deepcopy(base), config, progress=False)
        seconds = time.perf_counter() - start
        nbytes, numel = linear_weight_bytes(qmodel)
        models[f"holdall {label}"] = qmodel
        rows[f"holdall {label}"] = {
            "tool": "holdall",
            "linear_bytes": nbytes,
            "bits_per_weight": 8 * nbytes / numel,
            "model_bytes": model_bytes(qmodel),
            "quantize_s": seconds,
        }
    if not args.skip_bnb:
        for dq in (False, True):
            label = "bitsandbytes nf4 b64" + (" + dq" if dq else "")
            start = time.perf_counter()
            qmodel = bnb_nf4(base, dq)
            seconds = time.perf_counter() - start
            nbytes, numel, hidden = bnb_linear_bytes(qmodel)
            models[label] = qmodel
            rows[label] = {
                "tool": "bitsandbytes",
                "linear_bytes": nbytes,
                "bits_per_weight": 8 * nbytes / numel,
                "model_bytes": model_bytes(qmodel) + hidden,
                "quantize_s": seconds,
            }

    text = load_text(wikitext2("test"))
    results = evaluate_many(models, tokenizer, text, base=base, seq_len=args.seq_len, max_windows=args.windows)
    for name, result in results.items():
        rows[name].update(ppl=result.ppl, kld=result.kld_mean, top1=result.top1_agreement)
    any_result = next(iter(results.values()))
    rows["base fp32"].update(ppl=any_result.base_ppl, kld=0.0, top1=1.0, bits_per_weight=32.0)

    machine = f"{cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    meta = {
        "model": args.model,
        "text": "WikiText-2 test",
        "seq_len": args.seq_len,
        "windows": any_result.n_windows,
        "scored_tokens": any_result.n_tokens,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "foundation_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = render_markdown(meta, rows)
    (out / "foundation_quality.md").write_text(table)
    print(table)
    plot(rows, out / "foundation_quality.png")


def render_markdown(meta: dict, rows: dict[str, dict]) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (fp32, dequantized from the packaged Q4_1 GGUF), {meta['text']}, "
        f"{meta['windows']} x {meta['seq_len']}-token windows ({meta['scored_tokens']:,} scored tokens); "
        f"machine: {meta['machine']}; {meta['date']}.",
        "",
        "| format | tool | PPL | KLD vs base | top-1 agree | linear-weight MB | bits/weight | model MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name.removeprefix('holdall ').removeprefix('bitsandbytes ')} | {r['tool']} | {r['ppl']:.3f} | "
            f"{r['kld']:.5f} | {r['top1']:.3f} | {r['linear_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} | "
            f"{r['model_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: the table is the result
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"holdall": ("tab:blue", "o", "holdall"), "bitsandbytes": ("tab:red", "x", "bitsandbytes"),
              "-": ("black", "s", "fp32 base")}
    for tool, (colour, marker, label) in styles.items():
        points = [(r["linear_bytes"] / 1e6, r["ppl"]) for r in rows.values() if r["tool"] == tool]
        if points:
            ax.scatter(*zip(*points), color=colour, marker=marker, label=label, s=40)
    for name, r in rows.items():
        if r["tool"] == "holdall":  # bitsandbytes' NF4 points sit on holdall's: label them once
            ax.annotate(name.removeprefix("holdall "), (r["linear_bytes"] / 1e6, r["ppl"]), fontsize=7,
                        xytext=(5, -3 if "dq" in name else 3), textcoords="offset points")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("decoder linear weights (MB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, WikiText-2: perplexity vs size of the quantized linears")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
