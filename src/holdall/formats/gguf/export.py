"""``export_gguf``: a Hugging Face Llama-family model -> one GGUF file that llama.cpp runs unchanged.

The pipeline, one tensor in memory at a time::

    model (+ tokenizer) --convert.convert_model--> named tensors + hparams
                        --filetypes.plan_tensor_types--> ggml type per tensor (llama-quantize's rules)
                        --quants.quantize--> block bytes --GGUFWriter--> temp file --rename--> OUT.gguf

llama-quantize reads its weights from an F16 GGUF, so for a block-quantized type a float32 weight is first
rounded to float16 and back: with the non-calibrated encoders the tensor bytes then equal what
``llama_model_quantize`` makes from holdall's own F16 export. bfloat16/float16 weights are used as they are
(float16 holds every bfloat16 value of ordinary weights exactly).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError, DataError, require
from ...fileio import atomic_path
from . import quants
from .convert import Conversion, SourceTensor, convert_model, write_hparams
from .filetypes import FileType, TypePlan, get_file_type, plan_tensor_types
from .vocab import vocab_from_tokenizer, write_vocab

GGML_QUANT_VERSION = 2  # general.quantization_version llama.cpp writes (ggml.h GGML_QNT_VERSION)


def export_gguf(
    model_or_spec: nn.Module | str | os.PathLike,
    output_path: str | os.PathLike,
    file_type: str | FileType = "Q4_K_M",
    tokenizer=None,
    imatrix: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    calibration_text: str | None = None,
    calibration_chunks: int = 64,
    refine: str = "none",
    hessians: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model_or_spec`` as a GGUF file of ``file_type`` (``"Q4_K_M"``, ``"Q8_0"``, ``"F16"`` ...).

    model_or_spec: a loaded transformers Llama / Mistral / Qwen2 causal LM, or anything ``load_model``
        accepts (hub id, HF directory, .gguf file, alias). A loaded model needs ``tokenizer``.
    imatrix: optional importance per input column, ``{gguf_tensor_name: float32 [row_length]}`` (e.g.
        ``"blk.0.ffn_down.weight"``), passed to the encoders as llama-quantize's --imatrix would be.
    calibration_text: text to measure an importance matrix on (``formats.gguf.imatrix.collect_imatrix``:
        ``calibration_chunks`` chunks of 512 tokens) when no ``imatrix`` is given — llama-imatrix's information,
        computed by holdall on the float model.
    refine: ``"none"`` (the imatrix encoders' bytes, llama-quantize --imatrix's) or ``"gptq"``: with
        ``calibration_text``, also measure every linear's full input Hessian and let ``formats.gguf.refine``
        choose codes by error feedback and re-fit the scales inside the same ggml formats (same types, same
        size, llama.cpp reads it unmodified); every block type is refined, float tensors are stored as they are.
    hessians: with ``refine="gptq"``, precomputed ``{gguf_tensor_name: mean xᵀx [in, in]}`` (e.g.
        ``collect_statistics(..., hessians=True).hessians``) instead of measuring them on ``calibration_text``;
        ``imatrix`` then defaults to their diagonals.
    force: dequantize holdall-quantized layers and export them anyway (they are refused otherwise, because
        re-quantizing rounds the weights twice).
    Returns the absolute path of the written file; the file appears complete or not at all.
    """
    ft = get_file_type(file_type)  # a typo fails before any slow load
    if refine not in ("none", "gptq"):
        raise ConfigError(f"refine must be 'none' or 'gptq', got {refine!r}")
    if refine == "gptq" and calibration_text is None and hessians is None:
        raise ConfigError("refine='gptq' needs calibration_text: the error feedback uses each linear's full input "
                          "Hessian, measured on that text (an importance matrix alone holds only its diagonal)")
    output = _check_output(output_path)
    gguf = require("gguf", "hf", "GGUF export")
    model, tokenizer = _load(model_or_spec, tokenizer, ft)
    conversion = convert_model(model, force=force)
    hp = conversion.hparams
    if refine != "gptq" or not ft.is_quantized:
        hessians = None
    elif hessians is not None:
        hessians = _check_hessians(hessians, conversion)
        if imatrix is None:
            imatrix = {name: np.diagonal(h).astype(np.float32) for name, h in hessians.items()}
    else:
        from .imatrix import collect_statistics

        stats = collect_statistics(model, tokenizer, calibration_text, max_chunks=calibration_chunks,
                                   progress=progress, hessians=True)
        hessians = stats.hessians
        for note in stats.notes:
            warnings.warn(note, stacklevel=2)
        if imatrix is None:
            imatrix = stats.imatrix
    if refine != "gptq" and imatrix is None and calibration_text is not None and ft.is_quantized:
        from .imatrix import collect_imatrix

        imatrix = collect_imatrix(model, tokenizer, calibration_text, max_chunks=calibration_chunks, progress=progress)
    vocab = vocab_from_tokenizer(tokenizer, hp.n_vocab, model.config)
    plan = plan_tensor_types([(t.name, t.shape) for t in conversion.tensors], ft, hp.model_shape, imatrix is not None)
    importance = _check_imatrix(imatrix, conversion, plan.types)

    with atomic_path(output) as tmp:
        _write(_writer_class(gguf)(str(tmp), hp.arch), gguf, ft, conversion, vocab, plan.types, importance,
               progress, hessians)
    return output.resolve()


def _write(writer, gguf, ft: FileType, conversion: Conversion, vocab, types: dict[str, str], importance, progress,
           hessians=None):
    """Metadata and tensor infos first (every size is known from the plan), then the tensors one at a time."""
    try:
        writer.add_file_type(ft.ftype)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        write_hparams(writer, conversion.hparams)
        write_vocab(writer, vocab)
        for tensor in conversion.tensors:
            _add_tensor_info(writer, gguf, tensor, types[tensor.name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in _progress(conversion.tensors, ft, progress):
            hessian = None if hessians is None or tensor.name not in importance else hessians.get(tensor.name)
            # the three-argument call stays the plain path (the encode_tensor contract callers already rely on)
            extra = {} if hessian is None else {"hessian": hessian}
            writer.write_tensor_data(encode_tensor(tensor, types[tensor.name], importance.get(tensor.name), **extra))
    finally:
        writer.close()


def _writer_class(gguf):
    """gguf-py's GGUFWriter, with the long metadata arrays (the vocabulary's tokens, types, scores and merges:
    ~150k values for a 49k-token vocabulary) packed in one go rather than value by value, which cost a tenth of
    a small model's export. The bytes are the same; anything but a little-endian list of plain str, int or float
    values goes through gguf-py's own packing, as does everything when ``_pack_val`` is not the method this
    overrides (a gguf-py that changed it)."""
    import inspect

    base = gguf.GGUFWriter
    try:
        params = list(inspect.signature(base._pack_val).parameters)
    except (AttributeError, TypeError, ValueError):
        return base
    if params != ["self", "val", "vtype", "add_vtype", "sub_type"]:
        return base

    class Writer(base):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            fast = None
            if (vtype == gguf.GGUFValueType.ARRAY and sub_type is None and isinstance(val, (list, tuple))
                    and self.endianess == gguf.GGUFEndian.LITTLE):
                fast = _pack_list(gguf.GGUFValueType, val)
            if fast is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype, body = fast
            head = struct.pack("<I", vtype) if add_vtype else b""
            return head + struct.pack("<IQ", ltype, len(val)) + body

    return Writer


def _pack_list(types, values: list | tuple):
    """(element type, packed elements) of a homogeneous list of str, int (not bool) or float, as gguf-py packs
    them (STRING: u64 length + UTF-8; INT32; FLOAT32), or None for anything else (gguf-py then decides)."""
    if len(values) < 2:
        return None
    kind = type(values[0])
    if kind is str and all(type(v) is str for v in values):
        length = struct.Struct("<Q").pack
        encoded = [v.encode("utf-8") for v in values]
        return types.STRING, b"".join([length(len(e)) + e for e in encoded])
    if all(type(v) is int or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
        try:
            ints = np.array(values, dtype=np.int64)
        except OverflowError:
            return None
        if ints.min() < -(2**31) or ints.max() >= 2**31:
            return None  # gguf-py's struct.pack raises for those
        return types.INT32, ints.astype("<i4").tobytes()
    if kind is float and all(type(v) is float for v in values):
        doubles = np.array(values, dtype=np.float64)
        with np.errstate(over="ignore"):
            floats = doubles.astype("<f4")
        if (np.isinf(floats) & ~np.isinf(doubles)).any():
            return None  # struct.pack raises on float32 overflow
        return types.FLOAT32, floats.tobytes()
    return None


def gguf_tensor_types(model: nn.Module, file_type: str | FileType = "Q4_K_M", has_imatrix: bool = False) -> TypePlan:
    """The ggml type every tensor of ``model`` would get under ``file_type``, without encoding anything.

    A holdall-quantized model is planned from its layer shapes; nothing is dequantized.
    """
    conversion = convert_model(model, force=True)
    tensors = [(t.name, t.shape) for t in conversion.tensors]
    return plan_tensor_types(tensors, file_type, conversion.hparams.model_shape, has_imatrix)


# ------------------------------------------------------------------------------------------ inputs


def _check_output(output_path: str | os.PathLike) -> Path:
    """Fail before loading anything when the output cannot be written."""
    output = Path(output_path).expanduser()
    if output.is_dir():
        raise ConfigError(f"{output} is a directory; pass a file path such as {output / 'model-Q4_K_M.gguf'}")
    ancestor = output.parent.resolve()
    while not ancestor.exists():  # atomic_path creates missing folders; the first existing one must be writable
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {output}: {ancestor} is not a writable folder; choose another -o path")
    return output


def _load(model_or_spec, tokenizer, ft: FileType):
    if isinstance(model_or_spec, nn.Module):
        return model_or_spec, tokenizer
    from ...models.loading import load_model, resolve_model

    source = resolve_model(model_or_spec)  # a bad spec fails here, before weights are read
    if source.kind == "gguf" and ft.is_quantized:
        warnings.warn(
            f"{source.spec} is a GGUF file: its weights were dequantized on load, and {ft.name} rounds them "
            "again. Export from the original float model to avoid the double rounding.",
            stacklevel=3,
        )
    model, loaded_tokenizer = load_model(source, dtype=None)  # keep the checkpoint's own precision
    return model, tokenizer if tokenizer is not None else loaded_tokenizer


def _check_hessians(hessians: Mapping[str, Any], conversion: Conversion) -> dict[str, np.ndarray]:
    """Validate ``{tensor name: mean xᵀx [row_length, row_length]}`` against the model's tensors."""
    shapes = {t.name: t.shape for t in conversion.tensors}
    checked: dict[str, np.ndarray] = {}
    seen: dict[int, np.ndarray] = {}  # q/k/v (gate/up) share one matrix: convert it once, keep it shared
    for name, value in hessians.items():
        if name not in shapes:
            raise DataError(f"the Hessians name {name!r}, which this model has no tensor called")
        array = seen.setdefault(id(value), np.asarray(value, dtype=np.float32))
        n = shapes[name][-1]
        if array.shape != (n, n):
            raise DataError(f"the Hessian of {name} is {list(array.shape)}, its rows have {n} values: expected [{n}, {n}]")
        if not np.isfinite(array).all():
            raise DataError(f"the Hessian of {name} holds NaN or Inf values")
        checked[name] = array
    return checked


def _check_imatrix(imatrix: Mapping[str, Any] | None, conversion: Conversion, types: dict[str, str]):
    """Validate ``{tensor name: importance [row_length]}`` against the tensors that will be block-quantized."""
    if imatrix is None:
        return {}
    shapes = {t.name: t.shape for t in conversion.tensors}
    checked = {}
    for name, values in imatrix.items():
        if name not in shapes:
            raise DataError(
                f"the importance matrix names {name!r}, which this model has no tensor called; keys are GGUF "
                f"tensor names such as {next(iter(n for n in shapes if n.startswith('blk.')), 'blk.0.attn_q.weight')}"
            )
        array = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))
        if array.shape[0] != shapes[name][-1]:
            raise DataError(
                f"the importance of {name} has {array.shape[0]} values, its rows have {shapes[name][-1]}"
            )
        if not np.isfinite(array).all():
            raise DataError(f"the importance of {name} holds NaN or Inf values")
        if quants.TYPES[types[name]][1] > 1:  # only block types use an importance; floats are stored as-is
            checked[name] = array
    return checked


# ------------------------------------------------------------------------------------------ encoding


def _gguf_type(gguf, qtype: str):
    return gguf.GGMLQuantizationType[qtype]


def _add_tensor_info(writer, gguf, tensor: SourceTensor, qtype: str) -> None:
    n_per_row = tensor.shape[-1]
    quants.check_row_length(qtype, n_per_row)
    byte_shape = (*tensor.shape[:-1], quants.row_bytes(qtype, n_per_row))
    nbytes = int(np.prod(byte_shape))
    writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=_gguf_type(gguf, qtype))


def source_rows(weight: torch.Tensor, qtype: str) -> np.ndarray:
    """The float32 rows a tensor is encoded from: ``[n_rows, row_length]`` (a 1-D tensor is one row).

    For block types a float32 weight goes through float16 first, because that is what llama-quantize reads
    (an F16 GGUF). Weights beyond float16's range would become inf there; they are kept in float32 instead.
    numpy does the casts: single-threaded, it stays fast on a busy machine where torch's threads contend.
    """
    source_dtype = weight.dtype
    rows = weight.detach().to("cpu", torch.float32).numpy()
    if quants.TYPES[qtype][1] > 1 and source_dtype == torch.float32 and _fits_float16(rows):
        rows = _through_float16(rows)
    return rows.reshape(-1, rows.shape[-1])


def _fits_float16(rows: np.ndarray) -> bool:
    # min/max allocate nothing (abs would copy the tensor); NaN compares False and is refused by the encoder.
    return rows.size == 0 or max(-float(rows.min()), float(rows.max())) <= float(np.finfo(np.float16).max)


def _through_float16(rows: np.ndarray) -> np.ndarray:
    """``rows.astype(float16).astype(float32)`` bit for bit, for the finite values within float16's range that
    :func:`_fits_float16` admits (checked against numpy for every such float32), in a new array.

    numpy's two conversions cost ~5 ns a value; this costs ~2: float16's normal numbers keep 10 of float32's 23
    mantissa bits, so rounding to nearest even is integer arithmetic on the bits (a carry into the exponent is
    the correct result); below 2**-14 float16 is subnormal, a fixed step of 2**-24, which adding and removing
    0.75 (whose float32 step that is) rounds to, to nearest even; the sign is put back (−0.0 stays −0.0)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    bits = rows.view(np.uint32)
    out = bits >> 13
    out &= 1
    out += np.uint32(0xFFF)
    out += bits
    out &= np.uint32(0xFFFFE000)
    small = np.flatnonzero(np.abs(rows) < np.float32(2.0**-14))
    if small.size:
        x = rows.reshape(-1)[small]
        y = (x + np.float32(0.75)) - np.float32(0.75)
        out.reshape(-1)[small] = y.view(np.uint32) | (x.view(np.uint32) & np.uint32(0x80000000))
    return out.view(np.float32)


def encode_tensor(tensor: SourceTensor, qtype: str, importance: np.ndarray | None = None,
                  hessian: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes of one tensor, shaped ``[..., row_bytes]`` uint8 like its numpy-order shape.

    With ``hessian`` (the tensor's input ``mean xᵀx``) a block type is encoded by ``refine.refine_tensor``
    (error feedback inside the same format) instead of the plain imatrix encoder."""
    rows = source_rows(tensor.fetch(), qtype)
    if hessian is not None and quants.TYPES[qtype][1] > 1:
        from .refine import refine_tensor

        data = refine_tensor(rows, qtype, hessian, importance).raw
    else:
        data = quants.quantize(rows, qtype, importance)
    return data.reshape(*tensor.shape[:-1], data.shape[-1])


def _progress(tensors, ft: FileType, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(tensors, desc=f"export {ft.name}", unit="tensor", disable=not enabled, dynamic_ncols=True)
