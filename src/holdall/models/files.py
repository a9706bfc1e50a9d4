"""Cheap integrity checks of weight files, run before a file reaches transformers.

A truncated download or a half-copied export otherwise surfaces deep inside transformers or numpy as an
unrelated-looking error (a reshape failure, "incomplete metadata"). These checks read only headers, so they
cost milliseconds even for multi-gigabyte files, and every failure names the file and the fix.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from holdall.errors import CorruptFileError, require

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf.GGUFReader and transformers read; v1 predates tensor alignment

# Byte sizes of the dtypes safetensors may declare in a header.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


def _corrupt(path: Path, problem: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a valid file: {problem}. {fix}")


_REDOWNLOAD_GGUF = "Re-download or re-export the .gguf file (a partial download is the usual cause)."
_REEXPORT_SAFETENSORS = (
    "Re-download the model or re-export the directory (e.g. with holdall convert / save_hf); "
    "a partial download or an interrupted copy is the usual cause."
)


@dataclass(frozen=True)
class GGUFSummary:
    """What holdall needs from a GGUF header before handing the file to transformers."""

    path: Path
    version: int
    architecture: str
    name: str | None
    n_tensors: int
    file_type: int | None
    tensor_types: dict[str, int]  # ggml type name -> how many tensors use it


def check_gguf(path: str | Path) -> GGUFSummary:
    """Validate a GGUF file's magic, version, metadata and that every tensor's data lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise _corrupt(path, f"it does not start with the GGUF magic bytes (found {head[:4]!r})", _REDOWNLOAD_GGUF)
    version = struct.unpack("<I", head[4:8])[0]
    if version not in GGUF_VERSIONS:
        raise _corrupt(
            path,
            f"GGUF version {version} is not one of the supported versions {GGUF_VERSIONS}",
            "Re-convert the model with a current llama.cpp (convert_hf_to_gguf.py) or re-download it.",
        )

    gguf = require("gguf", "hf", "Reading GGUF files")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/... on any malformed header
        raise _corrupt(path, f"its header or tensor table cannot be parsed ({exc})", _REDOWNLOAD_GGUF) from exc

    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise _corrupt(
                path,
                f"tensor {tensor.name!r} needs bytes up to {end:,} but the file has only {size:,} "
                "(the file is truncated)",
                _REDOWNLOAD_GGUF,
            )

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    architecture = field("general.architecture")
    if not architecture:
        raise _corrupt(path, "it has no general.architecture metadata", _REDOWNLOAD_GGUF)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        name = gguf.GGMLQuantizationType(int(tensor.tensor_type)).name
        types[name] = types.get(name, 0) + 1
    return GGUFSummary(
        path=path,
        version=version,
        architecture=str(architecture),
        name=field("general.name"),
        n_tensors=len(reader.tensors),
        file_type=field("general.file_type"),
        tensor_types=types,
    )


def read_safetensors_header(path: str | Path) -> dict:
    """Parse and sanity-check a .safetensors header; raise CorruptFileError if the data cannot fit the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _corrupt(
                path, f"it is only {size} bytes long, shorter than a safetensors header", _REEXPORT_SAFETENSORS
            )
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise _corrupt(
                path, f"its header claims {header_len:,} bytes but the file has {size:,}", _REEXPORT_SAFETENSORS
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"its JSON header cannot be parsed ({exc})", _REEXPORT_SAFETENSORS) from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object", _REEXPORT_SAFETENSORS)

    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"the header entry for tensor {name!r} is malformed", _REEXPORT_SAFETENSORS) from exc
        if end > data_size:
            raise _corrupt(
                path,
                f"tensor {name!r} ends at byte {end:,} of the data section, which has only {data_size:,} bytes "
                "(the file is truncated)",
                _REEXPORT_SAFETENSORS,
            )
        if itemsize is not None and end - start != numel * itemsize:
            raise _corrupt(
                path,
                f"tensor {name!r} declares shape {info['shape']} of {info['dtype']} but spans {end - start} bytes",
                _REEXPORT_SAFETENSORS,
            )
    return header


def check_safetensors_dir(directory: str | Path) -> list[Path]:
    """Check every .safetensors file of a model directory; return them."""
    files = sorted(Path(directory).glob("*.safetensors"))
    for file in files:
        read_safetensors_header(file)
    return files


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` after a header check, with its errors turned into CorruptFileError."""
    path = Path(path)
    read_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise _corrupt(path, f"safetensors cannot read it ({exc})", _REEXPORT_SAFETENSORS) from exc
