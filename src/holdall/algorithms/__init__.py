"""``quantize(model, config)``: the one public verb for post-training quantization.

It dispatches on ``config.method`` through a small registry (``register_method``), so GPTQ/AWQ/HQQ plug
in later without changing callers.
"""

from __future__ import annotations

from torch import nn

from ..core.linear import QuantLinear
from ..errors import ConfigError
from . import rtn  # noqa: F401  (registers rtn / nf4 / fp4)
from .config import QuantConfig, get_method, method_names, register_method, select_layers

__all__ = ["QuantConfig", "quantize", "register_method", "method_names", "select_layers"]


def quantize(model: nn.Module, config: QuantConfig | None = None, progress: bool = True, force: bool = False) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place with ``QuantLinear``; return ``model``.

    config: what and how (default ``QuantConfig()``: rtn int4, groups of 128, every linear but the head).
    progress: show a tqdm bar over layers.
    force: quantize the remaining float linears of a model that already holds ``QuantLinear`` layers.
    Records ``model.holdall_quant = {"config": config.to_dict(), "layers": {name: scheme dict}}``.
    """
    if config is None:
        config = QuantConfig()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() needs a torch nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"quantize() needs a QuantConfig, got {type(config).__name__}; build one with QuantConfig(...) "
            "or QuantConfig.from_dict(...)"
        )
    done = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    if done and not force:
        raise ConfigError(
            f"the model is already quantized ({len(done)} QuantLinear layers, e.g. {done[0]!r}); quantizing again "
            "would round already-rounded weights (double rounding) and lose accuracy. Quantize the float model "
            "instead, or pass force=True to quantize only its remaining float linears"
        )
    names = select_layers(model, config)
    schemes = get_method(config.method).fn(model, names, config, progress)
    record = getattr(model, "holdall_quant", None) if done else None
    layers = dict(record["layers"]) if isinstance(record, dict) and "layers" in record else {}
    layers.update({name: scheme.to_dict() for name, scheme in schemes.items()})
    model.holdall_quant = {"config": config.to_dict(), "layers": layers}
    return model
