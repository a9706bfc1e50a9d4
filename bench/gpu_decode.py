"""Batch-1 decoding of a Llama-2-7B-shape model on one GPU: HF ``generate`` vs holdall's static-cache decoder
(issue 6, item 3), bf16 and 4-bit, with achieved bandwidth and % of the memory-bandwidth roofline.

One command on the device machine:

    PYTHONPATH=src python3 bench/gpu_decode.py --out $OUT/gpu_decode.json [--new-tokens 256] [--schemes int4-g128-sym,nf4-dq]

The model: ``LlamaConfig`` with Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000),
random bf16 weights (std 0.02; timings do not depend on the values). Rows, each in the same process:

* ``hf-generate bf16`` — ``model.generate`` (greedy, dynamic cache), the anchor's configuration;
* ``static bf16`` — :class:`holdall.serving.static_decode.StaticDecoder` (static KV cache, one CUDA graph per token);
* for each 4-bit scheme: the model's linears quantized by holdall (RTN; every decoder linear, not lm_head), then
  ``hf-generate`` and ``static`` on it (holdall's Triton GEMV kernels run in both); for int4 also
  ``static-int8-act`` (``int8_activations=True``, W4A8); ``--ablate`` adds round 5's step, the norms kept
  separate, the SiLU x up in a launch of its own and the int8 rows rounded in each GEMV instead of handed over
  (both the defaults since round 9).

Bytes per token = every parameter and buffer byte the step reads (packed codes, scales, zeros, norms, lm_head;
one embedding row) plus the KV cache the attention reads: the slots written so far, averaged over the decoded
tokens (the fused decode attention reads only those; before it, the masked SDPA read all ``max_len`` slots and the
accounting counted them all). Roofline = the card's measured device-to-device copy bandwidth (1 GiB,
read + write bytes). % of roofline = bytes per token x tokens/s / that bandwidth (gpt-fast's accounting, with the
cache included). The static decoder's logits are also checked against transformers' forward on the same weights
(teacher-forced, :func:`check_against_hf`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from holdall.core.linear import QuantLinear  # noqa: E402
from holdall.serving.static_decode import StaticDecoder  # noqa: E402

SCHEMES = {
    "int4-g128-sym": dict(method="rtn", bits=4, group_size=128, symmetric=True),
    "int4-g128-asym": dict(method="rtn", bits=4, group_size=128, symmetric=False),
    "nf4-dq": dict(method="nf4", double_quant=True),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting read + write bytes (best of 10)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 2 / best / 1e9


def build_model(layers: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # the rotary table's inv_freq buffer was left uninitialised by to_empty: build it again
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval()


def bytes_per_token(model, kv_slots: float) -> int:
    """Parameter and buffer bytes one decode step reads, plus ``kv_slots`` slots of every layer's K and V."""
    total = 0
    embed = model.model.embed_tokens.weight
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            if t is embed:
                total += embed.shape[1] * embed.element_size()  # one row is gathered
            elif "inv_freq" not in name:
                total += t.numel() * t.element_size()
    if model.lm_head.weight is embed:  # tied: the head reads the whole table
        total += embed.numel() * embed.element_size()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    total += int(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * kv_slots * head_dim * 2)
    return total


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    model.generate(prompt[None], **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt[None], **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out[0, prompt.numel():].tolist(), new_tokens / seconds


def static_decode(model, prompt: torch.Tensor, new_tokens: int, max_len: int, handoff: bool = True,
                  glu: bool = True, **options) -> tuple[list[int], float]:
    decoder = StaticDecoder(model, max_len=max_len, **options)
    decoder._int8_handoff = handoff  # int8 words handed between GEMVs (the default with int8 activations)
    decoder._glu = glu  # silu(gate) * up in the gate/up GEMV's epilogue (the default) or its own launch
    decoder.generate(prompt, 8)  # capture + warm-up (the capture is outside the timed part anyway)
    best = None
    for _ in range(3):
        result = decoder.generate(prompt, new_tokens)
        if best is None or result.tokens_per_s > best.tokens_per_s:
            best = result
    return best.tokens, best.tokens_per_s


@torch.no_grad()
def check_against_hf(model, prompt: torch.Tensor, tokens: list[int], max_len: int, n: int = 32, **options) -> dict:
    """Teacher-forced: the captured decode step's logits on ``prompt + tokens[:n]`` against transformers' forward
    over the same sequence (random weights give near-flat logits, so free-running greedy paths may part early
    on a rounding difference; the logits say whether the two compute the same thing)."""
    P = prompt.numel()
    seq = torch.cat([prompt, torch.tensor(tokens[:n], device=prompt.device)])
    reference = model(seq[None]).logits[0, P - 1 : P - 1 + n].float()
    decoder = StaticDecoder(model, max_len=max_len, **options)
    got = [decoder.prefill(prompt).clone()]
    for j in range(n - 1):
        got.append(decoder.step(seq[P + j], P + j).clone())
    got = torch.stack(got)
    return {"max_rel_logit_diff": round(float((got - reference).abs().max() / reference.abs().max()), 4),
            "argmax_agreement": round(float((got.argmax(-1) == reference.argmax(-1)).float().mean()), 3)}


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set while the block runs (the kernels are chosen when a decoder captures its step),
    restored after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def triton_gemv():
    """Round 9's Triton GEMVs instead of the Gluon ones (``HOLDALL_GLUON=0``)."""
    return environment(HOLDALL_GLUON="0")


def no_pdl():
    """Every decode kernel launched without programmatic dependent launch (``HOLDALL_PDL=0``, round 10's step)."""
    return environment(HOLDALL_PDL="0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--schemes", default="int4-g128-sym,nf4-dq")
    parser.add_argument("--skip-hf", action="store_true", help="only the static decoder (faster)")
    parser.add_argument("--skip-bf16", action="store_true", help="only the 4-bit schemes")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the static decoder without its fused attention, stacked projections and "
                             "folded norms (round 5's step), and 4-bit models with the norms separate")
    args = parser.parse_args()
    device = torch.device("cuda")
    max_len = args.prompt_tokens + args.new_tokens
    bandwidth = copy_bandwidth(device)
    info = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "date": dt.date.today().isoformat(), "copy_GBps": round(bandwidth, 1), "layers": args.layers,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "max_len": max_len,
            "kv_slots_per_token": args.prompt_tokens + args.new_tokens / 2}
    log(json.dumps(info))
    model = build_model(args.layers, device)
    prompt = torch.randint(0, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []

    # decode step t (t = 1..new-1) reads the prompt's slots and the t written since: prompt + new/2 on average
    kv_slots = args.prompt_tokens + args.new_tokens / 2

    def record(weights: str, path: str, tokens_per_s: float, check: dict | None):
        nbytes = bytes_per_token(model, kv_slots)
        row = {"weights": weights, "path": path, "tokens_per_s": round(tokens_per_s, 2),
               "bytes_per_token_GB": round(nbytes / 1e9, 3), "GBps": round(nbytes * tokens_per_s / 1e9, 1),
               "roofline_pct": round(100 * nbytes * tokens_per_s / 1e9 / bandwidth, 1)}
        if check is not None:
            row.update(check)
        rows.append(row)
        log(json.dumps(row))
        return row

    def measure(weights: str) -> None:
        if not args.skip_hf:
            _, tps = hf_generate(model, prompt, args.new_tokens)
            record(weights, "hf-generate", tps, None)
        if args.ablate:
            _, tps = static_decode(model, prompt, args.new_tokens, max_len, fused_attention=False,
                                   stack_projections=False, fuse_norms=False)
            record(weights, "static-unfused", tps, None)
            if weights != "bf16":  # the norms fold only into the 4-bit GEMVs (Hopper): the default there
                _, tps = static_decode(model, prompt, args.new_tokens, max_len, fuse_norms=False)
                record(weights, "static-norms-separate", tps, None)
                _, tps = static_decode(model, prompt, args.new_tokens, max_len, glu=False)
                record(weights, "static-silu-separate", tps, None)
        tokens, tps = static_decode(model, prompt, args.new_tokens, max_len)
        record(weights, "static", tps, check_against_hf(model, prompt, tokens, max_len))
        if weights.startswith("int4"):  # round 11's A/B: the same step without programmatic dependent launch
            with no_pdl():
                plain, tps = static_decode(model, prompt, args.new_tokens, max_len)
            row = record(weights, "static-no-pdl", tps, check_against_hf(model, prompt, plain, max_len))
            row["same_tokens_as_static"] = plain == tokens  # PDL moves loads, not arithmetic: bit-identical steps
        if weights.startswith("int4"):  # round 10's A/B: the same step on round 9's Triton GEMV instead of Gluon's
            with triton_gemv():
                tokens, tps = static_decode(model, prompt, args.new_tokens, max_len)
            record(weights, "static-triton-gemv", tps, check_against_hf(model, prompt, tokens, max_len))
        if weights.startswith("int4"):  # W4A8: every decode step's 4-bit projections on int8-rounded inputs
            tokens, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True)
            record(weights, "static-int8-act", tps,
                   check_against_hf(model, prompt, tokens, max_len, int8_activations=True))
            with no_pdl():
                plain, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True)
            row = record(weights, "static-int8-act-no-pdl", tps,
                         check_against_hf(model, prompt, plain, max_len, int8_activations=True))
            row["same_tokens_as_static"] = plain == tokens
            with triton_gemv():  # the same W4A8 step on round 9's Triton kernel
                tokens, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True)
            record(weights, "static-int8-act-triton-gemv", tps,
                   check_against_hf(model, prompt, tokens, max_len, int8_activations=True))
            if args.ablate:
                _, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True, handoff=False)
                record(weights, "static-int8-act-no-handoff", tps, None)
                _, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True,
                                       fuse_norms=False)
                record(weights, "static-int8-act-norms-separate", tps, None)
                _, tps = static_decode(model, prompt, args.new_tokens, max_len, int8_activations=True, glu=False)
                record(weights, "static-int8-act-silu-separate", tps, None)

    if not args.skip_bf16:
        measure("bf16")
    from holdall.algorithms import QuantConfig, quantize

    original = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    for label in [s for s in args.schemes.split(",") if s]:
        spec = dict(SCHEMES[label])
        method = spec.pop("method")
        start = time.perf_counter()
        quantize(model, QuantConfig.for_method(method, **spec), progress=False)
        log(f"{label}: quantized in {time.perf_counter() - start:.1f} s")
        assert any(isinstance(m, QuantLinear) for m in model.modules())
        measure(label)
        # back to the bf16 weights for the next scheme (never re-quantize a quantized model)
        for name, weight in original.items():
            parent, _, leaf = name.rpartition(".")
            holder, _, child = parent.rpartition(".")
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=weight.dtype)
            linear.weight.data.copy_(weight)
            setattr(model.get_submodule(holder), child, linear)
        if hasattr(model, "holdall_quant"):
            del model.holdall_quant
        torch.cuda.empty_cache()
    hf = {r["weights"]: r["tokens_per_s"] for r in rows if r["path"] == "hf-generate"}
    for r in rows:
        if r["path"].startswith("static") and "bf16" in hf:
            r["speedup_vs_hf_bf16"] = round(r["tokens_per_s"] / hf["bf16"], 2)
        if r["path"].startswith("static") and r["weights"] in hf:
            r["speedup_vs_hf_same_weights"] = round(r["tokens_per_s"] / hf[r["weights"]], 2)
    report = {"info": info, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
