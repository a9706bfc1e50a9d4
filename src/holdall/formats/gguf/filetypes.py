"""llama.cpp file types ("Q4_K_M", "Q8_0", ...) and the ggml type each tensor of a model gets under one.

A file type is a recipe, not a single type: ``Q4_K_M`` stores most weights as Q4_K but gives the output head
Q6_K and half of the ``attn_v`` / ``ffn_down`` matrices Q6_K, because those lose the most accuracy. holdall
reproduces llama.cpp's choice exactly (``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in
``src/llama-quant.cpp``, as shipped in llama-cpp-python 0.3.36), so a file holdall writes is the file
``llama-quantize`` would write from an F16 GGUF of the same model. ``tests/test_gguf_filetypes.py`` checks that
against ``llama_model_quantize`` itself.

Only the rules that can fire for the dense architectures holdall exports (llama, qwen2) and the file types
below are reproduced: the IQ*/TQ* mixes, Falcon and mixture-of-experts branches are left out on purpose.
Shapes are given in numpy / PyTorch order (``[rows, row_length]``); llama.cpp's ``ne[0]`` is the last entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ...errors import ConfigError
from .quants import TYPES


@dataclass(frozen=True)
class FileType:
    """One ``llama-quantize`` file type: its name, ``general.file_type`` value and default tensor type."""

    name: str  # what users type: "Q4_K_M"
    ftype: int  # llama_ftype enum value (include/llama.h), stored as general.file_type
    default_type: str  # ggml type of every 2-D weight no rule below overrides
    description: str

    @property
    def is_quantized(self) -> bool:
        """Block-quantized (the rules apply) rather than a plain float type (F32 / F16 / BF16)."""
        return TYPES[self.default_type][1] > 1


# llama_ftype values from include/llama.h (LLAMA_FTYPE_ALL_F32 = 0, LLAMA_FTYPE_MOSTLY_F16 = 1, ...).
_FILE_TYPES = (
    FileType("F32", 0, "F32", "32-bit floats, lossless"),
    FileType("F16", 1, "F16", "16-bit floats; what llama-quantize reads"),
    FileType("BF16", 32, "BF16", "bfloat16"),
    FileType("Q8_0", 7, "Q8_0", "8.5 bpw, practically lossless"),
    FileType("Q6_K", 18, "Q6_K", "6.56 bpw"),
    FileType("Q5_K_M", 17, "Q5_K", "~5.7 bpw; Q6_K for half of attn_v / ffn_down"),
    FileType("Q5_K_S", 16, "Q5_K", "~5.5 bpw"),
    FileType("Q4_K_M", 15, "Q4_K", "~4.9 bpw; the usual choice; Q6_K for half of attn_v / ffn_down"),
    FileType("Q4_K_S", 14, "Q4_K", "~4.6 bpw; Q5_K for the first attn_v / ffn_down"),
    FileType("Q3_K_L", 13, "Q3_K", "~4.3 bpw; Q5_K for attn_v, attn_output, ffn_down"),
    FileType("Q3_K_M", 12, "Q3_K", "~3.9 bpw; Q4_K/Q5_K for attn_v, attn_output, ffn_down"),
    FileType("Q3_K_S", 11, "Q3_K", "~3.5 bpw"),
    FileType("Q2_K", 10, "Q2_K", "~3.0 bpw; Q3_K/Q4_K for attn_v, attn_output, ffn_down"),
    FileType("Q4_0", 2, "Q4_0", "4.5 bpw, legacy"),
    FileType("Q4_1", 3, "Q4_1", "5.0 bpw, legacy"),
    FileType("Q5_0", 8, "Q5_0", "5.5 bpw, legacy"),
    FileType("Q5_1", 9, "Q5_1", "6.0 bpw, legacy"),
)
FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in _FILE_TYPES}


def get_file_type(name: str | FileType) -> FileType:
    """The :class:`FileType` called ``name`` (case-insensitive); ConfigError listing the choices otherwise."""
    if isinstance(name, FileType):
        return name
    file_type = FILE_TYPES.get(str(name).upper())
    if file_type is None:
        raise ConfigError(
            f"unknown GGUF file type {name!r}. Choose one of: {', '.join(FILE_TYPES)} "
            "(Q4_K_M is the usual size/quality trade-off, Q8_0 is practically lossless)"
        )
    return file_type


@dataclass(frozen=True)
class ModelShape:
    """What the type rules need to know about the model besides tensor names and shapes."""

    arch: str  # llama.cpp architecture: "llama" or "qwen2"
    n_layer: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        # llama_hparams::n_gqa(): integer division, query heads per key/value head.
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama-model.cpp labels an 80-layer llama with grouped-query attention (and any 80-layer qwen2)
        # LLM_TYPE_70B, and only that label changes a rule (attn_v gets Q5_K instead of Q3_K/Q4_K).
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv)


@dataclass(frozen=True)
class TypePlan:
    """The ggml type of every tensor, and how many needed llama.cpp's shape fallback."""

    types: dict[str, str]
    n_fallback: int


# --------------------------------------------------------------------------------------------- rules


def _layer_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def llama_cpp_order(names: Iterable[str]) -> list[str]:
    """Tensor names in the order llama-quantize visits them (llama_model_loader's weight_name_comparer).

    The per-layer rules count attn_v / ffn_down tensors as they are visited, so the order matters: tensors
    outside the blocks first, then block by block, names sorted within each group.
    """
    return sorted(names, key=lambda name: (_layer_of(name), name))


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    # tensor_allows_quantization, restricted to the tensors a llama/qwen2 file holds.
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _category(name: str) -> str:
    # tensor_get_category: output/token_embd by exact name, the rest by substring, first match wins.
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part, category in (
        ("attn_qkv.weight", "attn_v"),  # llama.cpp treats fused qkv like attn_v (category_is_attn_v)
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return category
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers that get more bits: the first and last eighth, and every third between.

    The modulo only runs when ``i_layer >= n_layers // 8`` (short-circuit), so C's and Python's ``%`` agree.
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _Counters:
    """quantize_state_impl's running counts, advanced as tensors are visited in llama_cpp_order."""

    def __init__(self, names: Sequence[str], shape: ModelShape) -> None:
        self.n_attention_wv = sum(_category(n) == "attn_v" for n in names)
        self.n_ffn_down = shape.n_layer  # hparams.n_layer, not a count of tensors
        self.i_attention_wv = 0
        self.i_ffn_down = 0
        self.tied = "output.weight" not in names  # "assume tied until we see output.weight"
        self.n_fallback = 0


def _output_type(row_length: int, default: str) -> str:
    # The output head (and a tied token_embd, which is the head too) is the most sensitive tensor.
    if row_length % TYPES[default][1]:
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def _attn_v_type(ft: str, default: str, c: _Counters, shape: ModelShape) -> str:
    new = default
    if ft == "Q2_K":
        new = "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
    elif ft == "Q3_K_M":
        new = "Q5_K" if c.i_attention_wv < 2 else "Q4_K"
    elif ft == "Q3_K_L":
        new = "Q5_K"
    elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(c.i_attention_wv, c.n_attention_wv):
        new = "Q6_K"
    elif ft == "Q4_K_S" and c.i_attention_wv < 4:
        new = "Q5_K"
    if shape.is_70b and new in ("Q3_K", "Q4_K"):
        # 8 query heads share each attn_v row block in the 70B models: more bits cost almost nothing there.
        new = "Q5_K"
    c.i_attention_wv += 1
    return new


def _ffn_down_type(ft: str, default: str, c: _Counters, has_imatrix: bool) -> str:
    i, n = c.i_ffn_down, c.n_ffn_down
    new = default
    if ft == "Q2_K":
        new = "Q3_K"
    elif ft == "Q3_K_M":
        new = "Q5_K" if i < n // 16 else "Q4_K"
    elif ft == "Q3_K_L":
        new = "Q5_K"
    elif ft == "Q4_K_M":
        if use_more_bits(i, n):
            new = "Q6_K"
    elif ft == "Q5_K_M" and use_more_bits(i, n):
        new = "Q6_K"
    elif ft == "Q4_K_S" and i < n // 8:
        new = "Q5_K"
    elif ft in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        # llama.cpp guards the first ffn_down layers of Q4_0/Q5_0 only when an imatrix is given, so that
        # files made without one stay what they always were.
        new = "Q4_1" if ft == "Q4_0" else "Q5_1"
    c.i_ffn_down += 1
    return new


def _attn_output_type(ft: str, default: str) -> str:
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft, default)


def _rule_type(name: str, row_length: int, ft: FileType, c: _Counters, shape: ModelShape, has_imatrix: bool) -> str:
    """llama_tensor_get_type_impl for one quantizable tensor."""
    category = _category(name)
    default = ft.default_type
    if category == "output" or (category == "token_embd" and c.tied):
        return _output_type(row_length, default)
    if category == "attn_v":
        return _attn_v_type(ft.name, default, c, shape)
    if category == "ffn_down":
        return _ffn_down_type(ft.name, default, c, has_imatrix)
    if category == "attn_output":
        return _attn_output_type(ft.name, default)
    return default  # attn_q, attn_k, ffn_gate, ffn_up, untied token_embd: only IQ mixes change these


# Block-256 types fall back to a block-32 type when a row is not a multiple of 256 (SmolLM2's 576, say).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fallback(name: str, row_length: int, qtype: str, c: _Counters) -> str:
    """tensor_type_fallback: a type whose block divides the row, counted like llama.cpp counts it."""
    if row_length % TYPES[qtype][1] == 0:
        return qtype
    c.n_fallback += 1
    new = _FALLBACK.get(qtype)
    if new is None:
        raise ConfigError(
            f"{name} has rows of {row_length} values, which {qtype} (blocks of {TYPES[qtype][1]}) cannot store, "
            "and llama.cpp defines no fallback for it; choose a K-quant file type or F16"
        )
    if row_length % TYPES[new][1]:
        new = "F16"  # llama.cpp's last resort for rows that are not even a multiple of 32
    return new


def plan_tensor_types(
    tensors: Sequence[tuple[str, Sequence[int]]],
    file_type: str | FileType,
    shape: ModelShape,
    has_imatrix: bool = False,
) -> TypePlan:
    """The ggml type of every tensor (``(gguf_name, numpy_shape)`` pairs) under ``file_type``.

    1-D tensors and norms stay F32, as convert_hf_to_gguf.py writes them and llama-quantize keeps them.
    ``has_imatrix`` matters for Q4_0/Q5_0 only (their first ffn_down layers then get Q4_1/Q5_1).
    """
    ft = get_file_type(file_type)
    shapes = {name: tuple(int(d) for d in dims) for name, dims in tensors}
    counters = _Counters(list(shapes), shape)
    types: dict[str, str] = {}
    for name in llama_cpp_order(shapes):
        dims = shapes[name]
        if not _allows_quantization(name, dims):
            types[name] = "F32"
        elif not ft.is_quantized:
            types[name] = ft.default_type
        else:
            row_length = dims[-1]
            qtype = _rule_type(name, row_length, ft, counters, shape, has_imatrix)
            types[name] = _fallback(name, row_length, qtype, counters)
    # Report in the caller's order, not llama.cpp's visiting order.
    return TypePlan({name: types[name] for name in shapes}, counters.n_fallback)
