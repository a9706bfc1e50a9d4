"""``QuantScheme``: the typed, frozen description of how one tensor is stored.

A scheme is pure data. Everything that quantizes, packs, saves or plans memory reads the same object, so
"int4, groups of 128, symmetric, fp16 scales" is spelled exactly one way throughout holdall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from ..errors import ConfigError

INT_BITS = (2, 3, 4, 5, 6, 8)
CODEBOOK_DTYPES = ("nf4", "fp4")
DTYPES = ("int",) + CODEBOOK_DTYPES
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Double quantization always uses bitsandbytes' layout: blocks of 256 scales, 8-bit dynamic map.
DOUBLE_QUANT_BLOCK = 256

_SHORT_SCALE = {"float16": "", "bfloat16": "-bf16", "float32": "-f32"}


@dataclass(frozen=True)
class QuantScheme:
    """How one weight tensor is quantized and stored.

    dtype: ``"int"`` (affine integers) or a 4-bit codebook, ``"nf4"`` / ``"fp4"`` (bitsandbytes-compatible).
    bits: int: one of 2, 3, 4, 5, 6, 8. nf4/fp4: always 4.
    granularity: int only: one scale for the whole ``"tensor"``, per output ``"channel"``, or per ``"group"``
        of ``group_size`` input elements (the last group of a row may be partial). nf4/fp4: always ``"group"``.
    group_size: int: elements per group along the input dim. nf4/fp4: block size over the flattened tensor.
    symmetric: int only; nf4/fp4 codebooks are symmetric by construction.
    double_quant: quantize the scales themselves to 8 bits (blocks of 256, mean offset), as QLoRA does.
    scale_dtype: dtype of int scales. nf4/fp4 absmax is always float32 (bitsandbytes' layout).
    """

    dtype: Literal["int", "nf4", "fp4"] = "int"
    bits: int = 4
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int = 128
    symmetric: bool = True
    double_quant: bool = False
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"QuantScheme.dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if not _is_int(self.bits):
            raise ConfigError(f"QuantScheme.bits must be an integer, got {self.bits!r}")
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise ConfigError(
                f"QuantScheme.group_size must be a positive integer, got {self.group_size!r}; "
                "use e.g. 128 for int groups or 64 for nf4/fp4 blocks"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"QuantScheme.granularity={self.granularity!r} is not supported; use one of {', '.join(GRANULARITIES)}"
            )
        for name in ("symmetric", "double_quant"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"QuantScheme.{name} must be True or False, got {getattr(self, name)!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"QuantScheme.scale_dtype={self.scale_dtype!r} is not supported; use one of {', '.join(SCALE_DTYPES)}"
            )
        if self.dtype == "int":
            if self.bits not in INT_BITS:
                raise ConfigError(
                    f"int quantization supports bits in {INT_BITS}, got bits={self.bits}; pick one of those widths"
                )
        else:
            if self.bits != 4:
                raise ConfigError(
                    f"{self.dtype} is a 4-bit codebook, got bits={self.bits}; set bits=4 "
                    "(or use dtype='int' for other widths)"
                )
            if self.granularity != "group":
                raise ConfigError(
                    f"{self.dtype} quantizes blocks of group_size elements of the flattened tensor; "
                    f"granularity={self.granularity!r} is meaningless for it, leave granularity='group'"
                )
            if not self.symmetric:
                raise ConfigError(
                    f"{self.dtype} codebooks are symmetric (absmax scaling); asymmetric needs dtype='int', "
                    "so set symmetric=True"
                )

    # --- derived facts -------------------------------------------------------------------------------
    @property
    def is_codebook(self) -> bool:
        """True for the 4-bit lookup-table formats (nf4/fp4)."""
        return self.dtype in CODEBOOK_DTYPES

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """The dtype scales are stored in (without double quantization): float32 for nf4/fp4."""
        return torch.float32 if self.is_codebook else SCALE_DTYPES[self.scale_dtype]

    @property
    def label(self) -> str:
        """A short human name: ``int4-g128-sym``, ``int8-ch-asym``, ``nf4-b64-dq``."""
        if self.is_codebook:
            text = f"{self.dtype}-b{self.group_size}"
        else:
            where = {"group": f"g{self.group_size}", "channel": "ch", "tensor": "t"}[self.granularity]
            text = f"int{self.bits}-{where}-{'sym' if self.symmetric else 'asym'}" + _SHORT_SCALE[self.scale_dtype]
        return text + ("-dq" if self.double_quant else "")

    def __str__(self) -> str:
        return self.label

    # --- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (stable keys, plain Python values)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantScheme":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently fall back)."""
        if isinstance(data, QuantScheme):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"a quantization scheme must be a dict (JSON object), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown QuantScheme field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
