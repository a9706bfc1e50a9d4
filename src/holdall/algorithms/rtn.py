"""Round-to-nearest: quantize each selected linear on its own, no calibration data.

Registers three methods that share this code and differ only in the scheme dtype they accept:
``rtn`` (affine int), ``nf4`` and ``fp4`` (bitsandbytes-compatible 4-bit codebooks).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..core.linear import QuantLinear
from ..core.scheme import QuantScheme
from ..errors import ConfigError
from .config import MethodRun, QuantConfig, register_method, set_submodule


def quantize_rtn(model: nn.Module, names: list[str], config: QuantConfig, run: MethodRun) -> dict[str, QuantScheme]:
    """Replace each named ``nn.Linear`` with a ``QuantLinear`` under ``config.scheme``, one at a time.

    Layers are looked up by name at each step (not held in a list), so every float weight can be freed as
    soon as its layer is replaced: peak memory stays near the float model's, not float + quantized.
    """
    schemes: dict[str, QuantScheme] = {}
    with torch.no_grad():
        for name in tqdm(names, desc=f"quantize {config.label}", unit="layer", disable=not run.progress):
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ConfigError(f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized")
            set_submodule(model, name, QuantLinear.from_linear(linear, config.scheme))
            schemes[name] = config.scheme
    return schemes


register_method(
    "rtn", quantize_rtn, ("int",), QuantScheme(), help="round-to-nearest affine integers (default int4, groups of 128)"
)
register_method(
    "nf4", quantize_rtn, ("nf4",), QuantScheme(dtype="nf4", group_size=64), help="QLoRA NormalFloat4, blocks of 64"
)
register_method(
    "fp4", quantize_rtn, ("fp4",), QuantScheme(dtype="fp4", group_size=64), help="bitsandbytes FP4, blocks of 64"
)
