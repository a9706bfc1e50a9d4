"""What int8 activations (W4A8) cost in quality, on a real model: SmolLM2-135M-Instruct on wikitext-2, CPU.

    PYTHONPATH=src python bench/int8_activation_quality.py --out bench/results/int8_activation_quality_smollm2.json

The decode kernels' ``XQ8`` option (``StaticDecoder(int8_activations=True)``, BENCHMARKS.md round 8) rounds every
4-bit projection's input to int8, one power-of-two scale per 8 inputs, before integer dot products. This scores,
on the same windows and against the float model (KL and top-1 agreement per position):

* ``fp32`` -- the model as loaded (the GGUF dequantized);
* ``int4 g{G}`` -- holdall RTN int4 symmetric, float activations (the decode kernels' default);
* ``int4 g{G} + holdall int8 act`` -- the same weights, each 4-bit layer's input rounded as the kernels do
  (:func:`holdall.kernels.packed.round_activations_s8`, through a forward pre-hook, every position);
* ``int4 g{G} + q8_1-style act`` -- the incumbent's choice for the same trick, re-implemented here in plain torch:
  llama.cpp's CUDA matrix-vector kernels round activations to its ``q8_1`` blocks (32 inputs, scale
  ``absmax / 127``, ``round(x / scale)``) before integer dot products.

Teacher-forced perplexity rounds every position's activations, which is what a decode step with the option does
to each new token. Timings are not measured here (the speed side is ``bench/gpu_kernels.py`` and
``bench/gpu_decode.py`` on the device).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from holdall.algorithms import QuantConfig, quantize  # noqa: E402
from holdall.core.linear import QuantLinear  # noqa: E402
from holdall.evaluation.perplexity import evaluate_many, format_results  # noqa: E402
from holdall.kernels.packed import round_activations_s8  # noqa: E402
from holdall.models.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def round_q8_1(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """llama.cpp's q8_1 activation rounding (blocks of 32, scale absmax / 127), as float."""
    blocks = x.float().reshape(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return (q * scale).reshape(x.shape).to(x.dtype)


def with_rounded_inputs(model: torch.nn.Module, rounding) -> torch.nn.Module:
    """A copy of ``model`` whose 4-bit layers see ``rounding(input)``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.register_forward_pre_hook(lambda m, args: (rounding(args[0]),))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--groups", default="64,128", help="int4 group sizes to score")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--text", type=Path, default=DATA)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)
    text = args.text.read_text(encoding="utf-8")
    models = {"fp32": base}
    for group in [int(g) for g in args.groups.split(",") if g]:
        q = quantize(copy.deepcopy(base), QuantConfig.for_method("rtn", bits=4, group_size=group), progress=False)
        models[f"int4 g{group}"] = q
        models[f"int4 g{group} + holdall int8 act"] = with_rounded_inputs(q, round_activations_s8)
        models[f"int4 g{group} + q8_1-style act"] = with_rounded_inputs(q, round_q8_1)
    with torch.inference_mode():
        results = evaluate_many(models, tokenizer, text, base=base, seq_len=args.seq_len,
                                max_windows=args.windows, progress=True)
    print(format_results(results))
    report = {"info": {"model": args.model, "date": dt.date.today().isoformat(), "torch": torch.__version__,
                       "seq_len": args.seq_len, "windows": args.windows, "text": str(args.text.name),
                       "threads": torch.get_num_threads()},
              "results": {name: r.to_dict() for name, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
