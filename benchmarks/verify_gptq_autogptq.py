"""Check holdall's GPTQ v1 export against AutoGPTQ's own packer and its torch dequantization (2/3/4/8 bits).

AutoGPTQ cannot be installed beside torch 2.13 (its CUDA extensions), but its ``QuantLinear`` classes run their
plain-torch fallback once the extension import fails. This script loads ``qlinear_cuda.py`` and
``qlinear_cuda_old.py`` straight from the AutoGPTQ 0.7.1 wheel (unpacked, never installed, never copied into
holdall) and, for every width and symmetric / asymmetric:

1. packs holdall's codes with AutoGPTQ's ``pack()`` (given holdall's scales and zeros and the weight they
   dequantize to) and checks ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` equal holdall's export bit for bit;
2. loads holdall's exported tensors into AutoGPTQ's layer and checks its torch forward on an identity input
   (which returns the dequantized weight) equals holdall's weight rounded to float16 as AutoGPTQ computes it.

Usage::

    pip download auto-gptq==0.7.1 --no-deps --only-binary :all: -d /tmp/ag
    python -m zipfile -e /tmp/ag/auto_gptq-0.7.1-*.whl /tmp/ag/pkg
    .venv/bin/python benchmarks/verify_gptq_autogptq.py /tmp/ag/pkg
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def load_qlinear(pkg: Path, name: str):
    path = pkg / "auto_gptq/nn_modules/qlinear" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"autogptq_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the CUDA extension import fails: the torch fallback is used
    return module.QuantLinear


def main(pkg: str) -> int:
    torch.set_num_threads(2)
    from conftest import make_tiny_llama
    from safetensors.torch import load_file

    from holdall.algorithms import QuantConfig, quantize
    from holdall.formats import export_checkpoint
    from holdall.formats.common import layer_codes

    classes = {name: load_qlinear(Path(pkg), name) for name in ("qlinear_cuda", "qlinear_cuda_old")}
    failures = 0
    for bits in (2, 3, 4, 8):
        for symmetric in (True, False):
            torch.manual_seed(bits)
            model = make_tiny_llama(hidden=64, intermediate=128)
            # asymmetric GPTQ v1 cannot hold a zero point of 0; random weights straddle 0, so none occurs
            config = QuantConfig.for_method("rtn", bits=bits, group_size=32, symmetric=symmetric)
            quantize(model, config, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                out = export_checkpoint(model, Path(tmp) / "gptq", format="gptq")
                stored = load_file(str(out / "model.safetensors"))
            for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
                layer = model.get_submodule(name)
                weight = layer.dequantize_weight(torch.float32)
                scale = layer.quantized_weight.tensors()["scale"]
                zero = layer_codes(layer).zero.to(torch.int32)
                for cls_name, cls in classes.items():
                    ref = cls(bits, 32, layer.in_features, layer.out_features, bias=False)
                    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
                    linear.weight.data = weight.clone()
                    ref.pack(linear, scale.float(), zero.clone(), torch.arange(layer.in_features) // 32)
                    packed_equal = all(
                        torch.equal(getattr(ref, key).cpu(), stored[f"{name}.{key}"].to(getattr(ref, key).dtype))
                        for key in ("qweight", "qzeros", "g_idx")
                    ) and torch.equal(ref.scales.half(), stored[f"{name}.scales"])
                    ref = cls(bits, 32, layer.in_features, layer.out_features, bias=False)
                    for key in ("qweight", "qzeros", "scales", "g_idx"):
                        setattr(ref, key, stored[f"{name}.{key}"].clone())
                    with torch.no_grad():
                        dense = ref(torch.eye(layer.in_features, dtype=torch.float16)).T  # [out, in]
                    weights_equal = torch.equal(dense, weight.half())
                    ok = packed_equal and weights_equal
                    failures += not ok
                    print(f"int{bits} {'sym ' if symmetric else 'asym'} {name:34s} AutoGPTQ {cls_name:16s} "
                          f"pack() bytes equal: {packed_equal}  torch dequant equal: {weights_equal}")
    print("all equal" if not failures else f"{failures} MISMATCHES")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ag/pkg"))
