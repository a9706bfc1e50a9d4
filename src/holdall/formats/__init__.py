"""Ecosystem file formats holdall writes and reads.

* ``gguf/``: llama.cpp's GGUF (export from the float model).
* ``compressed_tensors.py``, ``gptq.py``, ``awq.py``: the quantized checkpoints llm-compressor / AutoGPTQ /
  GPTQModel / AutoAWQ write and transformers / vLLM load, exported from a holdall-quantized model with its codes
  unchanged (:func:`export_checkpoint`) and read back into ``QuantLinear``s by ``load_model``.
* ``common.py``: what those three share (int32 bit streams, atomic sharded writes, the read path).

Formats build on the quantization core and the model-family layer only. ``models.load_model`` sits below this
layer, so importing this package registers the three readers with it (``models.loading.register_quantized_reader``);
``holdall.load_model`` and the CLI import it first. Importing it is light: torch and the model layer, never
transformers; the format modules are imported when a checkpoint is written or read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.loading import register_quantized_reader

#: ``export_checkpoint`` formats: holdall's own, and the three ecosystem layouts.
FORMATS = ("holdall", "gptq", "awq", "compressed-tensors")


def export_checkpoint(
    model,
    out_dir: str | os.PathLike,
    format: str = "holdall",
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a holdall-quantized model as a checkpoint of ``format``; return the directory.

    holdall: holdall's own (any scheme, bit-exact; ``models.save_quantized``). gptq: GPTQ v1
    (qweight/qzeros/scales/g_idx, AutoGPTQ / GPTQModel / transformers / vLLM). awq: AutoAWQ's GEMM layout.
    compressed-tensors: llm-compressor's ``pack-quantized`` (transformers with compressed-tensors, vLLM).
    The directory appears complete or not at all; a model the format cannot hold is refused with the reason.
    """
    if format == "holdall":
        from ..models.checkpoint import save_quantized

        return save_quantized(model, tokenizer, out_dir, overwrite=overwrite)
    if format == "gptq":
        from .gptq import export_gptq

        return export_gptq(model, out_dir, tokenizer, overwrite=overwrite)
    if format == "awq":
        from .awq import export_awq

        return export_awq(model, out_dir, tokenizer, overwrite=overwrite)
    if format == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, out_dir, tokenizer, overwrite=overwrite)
    raise ConfigError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")


def check_exportable(model, names: list[str], scheme, format: str) -> None:
    """Raise a ConfigError now if quantizing ``model``'s linears ``names`` with ``scheme`` would give a model that
    ``export_checkpoint(..., format=format)`` must refuse (wrong width, codebook, partial groups, layers left out):
    ``holdall quantize --format`` calls it before a long calibration, not after."""
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "holdall":
        return
    if not names:
        raise ConfigError(f"no linear layer is selected for quantization, so there is nothing to write as {format}")
    if format == "gptq":
        from .gptq import check_exportable as check
    elif format == "awq":
        from .awq import check_exportable as check
    else:
        from .compressed_tensors import check_exportable as check
    check(model, list(names), scheme)


def _read_gptq(directory: Path, dtype, device):
    from .gptq import load_gptq

    return load_gptq(directory, dtype=dtype, device=device)


def _read_awq(directory: Path, dtype, device):
    from .awq import load_awq

    return load_awq(directory, dtype=dtype, device=device)


def _read_compressed_tensors(directory: Path, dtype, device):
    from .compressed_tensors import load_compressed_tensors

    return load_compressed_tensors(directory, dtype=dtype, device=device)


register_quantized_reader("gptq", _read_gptq)
register_quantized_reader("awq", _read_awq)
register_quantized_reader("compressed-tensors", _read_compressed_tensors)

__all__ = ["FORMATS", "check_exportable", "export_checkpoint"]
