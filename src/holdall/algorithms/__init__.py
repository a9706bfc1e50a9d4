"""``quantize(model, config)``: the one public verb for post-training quantization.

It dispatches on ``config.method`` through a small registry (``register_method``): ``rtn`` / ``nf4`` / ``fp4``
(round-to-nearest), ``hqq`` (calibration-free optimized zero/scale), ``gptq`` and ``awq`` (calibrated, run layer by
layer by the sequential engine in ``sequential.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.linear import QuantLinear
from ..errors import ConfigError
from . import awq, gptq, hqq, rtn  # noqa: F401  (register awq / gptq / hqq / rtn / nf4 / fp4)
from .awq import AWQConfig, awq_scale_model
from .calibration import CalibrationConfig, calibration_ids, check_calibration_ids
from .config import MethodResult, MethodRun, QuantConfig, get_method, method_names, register_method, select_layers
from .gptq import GPTQConfig
from .hqq import HQQConfig

__all__ = [
    "AWQConfig",
    "CalibrationConfig",
    "GPTQConfig",
    "HQQConfig",
    "QuantConfig",
    "awq_scale_model",
    "dequantize",
    "quantize",
    "register_method",
    "method_names",
    "select_layers",
]


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    progress: bool = True,
    force: bool = False,
    *,
    tokenizer: Any = None,
    calibration_data: torch.Tensor | None = None,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place with ``QuantLinear``; return ``model``.

    config: what and how (default ``QuantConfig()``: rtn int4, groups of 128, every linear but the head).
    progress: show a tqdm bar over layers (calibrated methods also print a summary to stderr).
    force: quantize the remaining float linears of a model that already holds ``QuantLinear`` layers.
    tokenizer: for calibrated methods (gptq, awq): tokenizes ``config.calibration``'s text. None = the tokenizer of
        the model's source when it was loaded with ``holdall.load_model``.
    calibration_data: for calibrated methods: token ids ``[n_samples, seq_len]`` to calibrate on instead of
        sampling ``config.calibration``'s text.
    Records ``model.holdall_quant = {"config": config.to_dict(), "layers": {name: scheme dict}}``, plus
    ``"report"`` (time, per-layer errors, bits/weight, notes) for calibrated methods.
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
    method = get_method(config.method)
    run = MethodRun(progress=progress)
    if method.needs_calibration:
        run.calibration_ids = _calibration_for(model, config, tokenizer, calibration_data)
    elif calibration_data is not None:
        raise ConfigError(f"method {config.method!r} is calibration-free; drop calibration_data=")
    result = method.fn(model, names, config, run)
    if not isinstance(result, MethodResult):
        result = MethodResult(result)
    record = getattr(model, "holdall_quant", None) if done else None
    layers = dict(record["layers"]) if isinstance(record, dict) and "layers" in record else {}
    layers.update({name: scheme.to_dict() for name, scheme in result.schemes.items()})
    model.holdall_quant = {"config": config.to_dict(), "layers": layers}
    if result.report is not None:
        model.holdall_quant["report"] = result.report
    return model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` of ``model`` in place with an ``nn.Linear`` holding its dequantized weight.

    This does not undo the rounding: the float weights are the quantized ones. It exists for the one case
    where a user *chooses* double rounding (``force``) and a float model is needed downstream.
    dtype: the new linears' dtype (None: each layer's own ``dtype``). Drops ``model.holdall_quant``.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        target = dtype or module.dtype
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=next(module.buffers()).device, dtype=target)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize_weight(torch.float32).to(target))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(target))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)
    if hasattr(model, "holdall_quant"):
        del model.holdall_quant
    return model


def _calibration_for(model: nn.Module, config: QuantConfig, tokenizer: Any, data: torch.Tensor | None) -> torch.Tensor:
    """Calibration token ids ``[n, seq_len]``: the caller's, or sampled from the configured text."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if data is not None:
        return check_calibration_ids(data, vocab if isinstance(vocab, int) else None)
    if tokenizer is None:
        tokenizer = _source_tokenizer(model)
    ids = calibration_ids(config.calibration, tokenizer)
    return check_calibration_ids(ids, vocab if isinstance(vocab, int) else None)


def _source_tokenizer(model: nn.Module) -> Any:
    """The tokenizer of the source a model was loaded from (``holdall.load_model`` records it), else None."""
    source = getattr(model, "holdall_source", None)
    if source is None:
        return None
    from ..models.loading import load_tokenizer

    return load_tokenizer(source)
