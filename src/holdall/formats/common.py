"""What the ecosystem checkpoint formats (GPTQ, AWQ, compressed-tensors) share: int32 bit streams, the write path
(safetensors shards + config.json + tokenizer, in one atomic step) and the read path (config.json -> an empty
architecture -> ``QuantLinear``s filled from a format's tensors -> a holdall model).

Each format module only translates between holdall's layer tensors (``qdata`` / ``scale`` / ``zero``, see
``core.qtensor``) and its own tensor names and bit orders; everything else is here, written once.

Bit streams (:func:`pack_int32` / :func:`unpack_int32`): the codes of a row form one LSB-first stream of 32-bit
words: code ``j`` of ``bits`` bits occupies stream bits ``[j*bits, (j+1)*bits)``, least significant first, and word
``k`` holds stream bits ``[32k, 32k+32)``. A code may straddle two words (3, 5, 6, 7 bits); 32 codes fill exactly
``bits`` words. This one rule is GPTQ's packing (its 3-bit "10 + 1 + 10 + 1 + 10" words included),
compressed-tensors' ``pack_to_int32`` and, for 4 bits after AWQ's nibble interleave, AWQ's.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..core.linear import QuantLinear
from ..core.packing import pack, unpack
from ..core.qtensor import QuantizedTensor
from ..core.scheme import QuantScheme
from ..errors import ConfigError, CorruptFileError, UnsupportedModelError, require
from ..fileio import atomic_dir
from ..models.families import check_supported, get_family, is_tied
from ..models.files import load_safetensors, read_safetensors_header
from ..models.loading import export_config
from ..models.state import dedup_state_dict

#: Largest shard written (bytes); bigger models are split into model-0000i-of-0000n.safetensors + an index.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SCALE_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# ---------------------------------------------------------------------------------------------------------
# int32 bit streams
# ---------------------------------------------------------------------------------------------------------


def packed_words(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return (n * bits + 31) // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` -> int32 with the same 32 bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[..., n]`` (each ``< 2**bits``) -> int32 ``[..., ceil(n*bits/32)]``, LSB-first stream."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"int32 packing takes codes of 1..8 bits, got bits={bits}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ConfigError(f"codes must lie in [0, {2**bits}) to be packed at {bits} bits")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    n_words = packed_words(n, bits)
    if 8 % bits == 0 and sys.byteorder == "little":
        # whole codes per byte: build the little-endian bytes of the words directly (no int64 detour)
        per = 8 // bits
        padded = _pad_last(codes.to(torch.uint8), n_words * 4 * per).reshape(*lead, n_words * 4, per)
        packed = padded[..., 0].clone()
        for k in range(1, per):
            packed |= padded[..., k] << (bits * k)
        return packed.contiguous().view(torch.int32)
    codes = codes.to(torch.int64)
    if 32 % bits == 0:  # whole codes per word: shift and add
        per = 32 // bits
        padded = _pad_last(codes, n_words * per).reshape(*lead, n_words, per)
        shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
        return _to_int32((padded << shifts).sum(dim=-1))
    # general widths: spell the stream out bit by bit, then regroup it into words
    bit_index = torch.arange(bits, dtype=torch.int64, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> bit_index) & 1).reshape(*lead, n * bits)
    stream = _pad_last(stream, n_words * 32).reshape(*lead, n_words, 32)
    return _to_int32((stream << torch.arange(32, dtype=torch.int64, device=codes.device)).sum(dim=-1))


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[..., ceil(n*bits/32)]`` -> uint8 codes ``[..., n]``."""
    if words.dtype != torch.int32:
        raise CorruptFileError(f"packed weights must be int32, got {words.dtype}")
    if not 1 <= bits <= 8:
        raise ConfigError(f"int32 packing takes codes of 1..8 bits, got bits={bits}")
    if words.shape[-1] != packed_words(n, bits):
        raise CorruptFileError(
            f"{n} codes of {bits} bits take {packed_words(n, bits)} int32 words, the tensor has {words.shape[-1]}"
        )
    lead = words.shape[:-1]
    if 8 % bits == 0 and sys.byteorder == "little":
        per = 8 // bits
        data = words.contiguous().view(torch.uint8)  # the words' little-endian bytes, in stream order
        codes = torch.stack([(data >> (bits * k)) & (2**bits - 1) for k in range(per)], dim=-1)
        return codes.reshape(*lead, -1)[..., :n].contiguous()
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
        codes = (unsigned.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(*lead, -1)[..., :n].to(torch.uint8).contiguous()
    stream = (unsigned.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=words.device)) & 1
    stream = stream.reshape(*lead, -1)[..., : n * bits].reshape(*lead, n, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int64, device=words.device)).sum(dim=-1)
    return codes.to(torch.uint8).contiguous()


def _pad_last(t: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - t.shape[-1]
    return t if extra == 0 else torch.cat([t, t.new_zeros(*t.shape[:-1], extra)], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# holdall layers <-> plain codes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LayerCodes:
    """One quantized linear as plain tensors: what every format translates from and to.

    codes uint8 ``[out, in]``; scale ``[out, G]`` in the scheme's scale dtype; zero uint8 ``[out, G]`` (for a
    symmetric scheme: the implicit midpoint ``2**(bits-1)`` everywhere, so formats that always store zeros can).
    """

    scheme: QuantScheme
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


def layer_codes(layer: QuantLinear) -> LayerCodes:
    """Unpack a ``QuantLinear``'s buffers (int schemes without double quantization)."""
    scheme = layer.scheme
    tensors = layer.quantized_weight.tensors()
    codes = unpack(tensors["qdata"].cpu(), scheme.bits, layer.in_features)
    scale = tensors["scale"].cpu()
    if scheme.symmetric:
        zero = torch.full(scale.shape, 2 ** (scheme.bits - 1), dtype=torch.uint8)
    else:
        zero = unpack(tensors["zero"].cpu(), scheme.bits, scale.shape[1])
    return LayerCodes(scheme, codes, scale, zero)


def scheme_for(
    bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype, where: str
) -> QuantScheme:
    """The holdall scheme of a layer read from a file (``group_size=None``: one scale per output channel)."""
    name = SCALE_DTYPE_NAMES.get(scale_dtype)
    if name is None:
        raise CorruptFileError(f"{where}: scales are {scale_dtype}; holdall reads float16, bfloat16 or float32 scales")
    try:
        if group_size is None:
            return QuantScheme(bits=bits, granularity="channel", symmetric=symmetric, scale_dtype=name)
        return QuantScheme(bits=bits, granularity="group", group_size=group_size, symmetric=symmetric, scale_dtype=name)
    except ConfigError as exc:
        raise UnsupportedModelError(f"{where}: holdall cannot hold this layer ({exc})") from exc


def codes_to_tensors(layer: LayerCodes) -> dict[str, torch.Tensor]:
    """``LayerCodes`` -> the holdall buffers (``qdata``, ``scale``, ``zero`` when asymmetric)."""
    scheme = layer.scheme
    tensors = {"qdata": pack(layer.codes.to(torch.uint8), scheme.bits), "scale": layer.scale.contiguous()}
    if not scheme.symmetric:
        tensors["zero"] = pack(layer.zero.to(torch.uint8), scheme.bits)
    return tensors


def detect_symmetric(zero: torch.Tensor, bits: int) -> bool:
    """A layer whose every zero point is the midpoint ``2**(bits-1)`` is stored as holdall's symmetric scheme.

    Lossless: symmetric means exactly that implicit zero, so codes, scales and dequantized weights are unchanged.
    """
    return bool((zero == 2 ** (bits - 1)).all())


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def quantized_layers(model: nn.Module, format_name: str) -> dict[str, QuantLinear]:
    """The model's ``QuantLinear``s by name, after checking it is a holdall-quantized model."""
    record = getattr(model, "holdall_quant", None)
    if not isinstance(record, dict) or not record.get("layers"):
        raise ConfigError(
            f"this model is not holdall-quantized, so there is nothing to write as {format_name}. Quantize it "
            "first (holdall.quantize(model, QuantConfig.for_method('gptq', bits=4, group_size=128)) or "
            f"holdall quantize MODEL --format {format_name} -o DIR), then export"
        )
    modules = dict(model.named_modules())
    layers = {}
    for name in record["layers"]:
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise ConfigError(
                f"model.holdall_quant lists {name!r}, but that module is "
                f"{type(module).__name__ if module is not None else 'missing'}, not a QuantLinear; the record is "
                "stale: re-run holdall.quantize on the float model"
            )
        layers[name] = module
    stray = [n for n, m in modules.items() if isinstance(m, QuantLinear) and n not in layers]
    if stray:
        raise ConfigError(f"QuantLinear(s) {stray[:3]} are missing from model.holdall_quant; re-run holdall.quantize")
    return layers


def refuse_unsupported_scheme(name: str, scheme: QuantScheme, format_name: str, *, bits: Iterable[int],
                              granularities: Iterable[str] = ("group", "channel"),
                              scale_dtypes: Iterable[str] = ("float16", "bfloat16", "float32")) -> None:
    """Raise a ConfigError naming the layer, its scheme and what to use instead when the format cannot hold it."""
    bits, granularities, scale_dtypes = tuple(bits), tuple(granularities), tuple(scale_dtypes)
    label = scheme.label
    if scheme.is_codebook:
        raise ConfigError(
            f"{name} is {label}: a {scheme.dtype} codebook scheme, which {format_name} cannot store ({format_name} "
            f"holds affine integer codes). Re-quantize the float model with an int scheme "
            f"(e.g. --method rtn/gptq --bits 4), or keep {scheme.dtype} in holdall's own format (--format holdall)"
        )
    if scheme.double_quant:
        raise ConfigError(
            f"{name} is {label}: its scales are double-quantized, which {format_name} cannot store; re-quantize "
            "without --double-quant, or keep it in holdall's own format (--format holdall)"
        )
    if scheme.bits not in bits:
        raise ConfigError(
            f"{name} is {label}: {scheme.bits}-bit codes, but {format_name} holds {'/'.join(map(str, bits))}-bit "
            f"ones. Re-quantize with --bits {bits[0] if 4 not in bits else 4}, or keep {scheme.bits} bits in "
            "holdall's own format (--format holdall)"
        )
    if scheme.granularity not in granularities:
        raise ConfigError(
            f"{name} is {label}: granularity {scheme.granularity!r}, but {format_name} holds "
            f"{' or '.join(granularities)} scales. Re-quantize with --granularity {granularities[0]}"
        )
    if scheme.scale_dtype not in scale_dtypes:
        raise ConfigError(
            f"{name} is {label}: {scheme.scale_dtype} scales, but {format_name} stores "
            f"{'/'.join(scale_dtypes)} scales and converting them would change the weights. Re-quantize with "
            f"scale_dtype={scale_dtypes[0]!r}"
        )


def uniform_scheme(model: nn.Module, layers: dict[str, QuantLinear], format_name: str) -> QuantScheme:
    """The one scheme of a format whose config is global (GPTQ, AWQ): every decoder linear, one scheme, nothing else.

    Their loaders build a quantized layer for every linear of every decoder block from a single
    ``bits`` / ``group_size``; a float or differently quantized layer would be read wrongly or not at all.
    """
    require_decoder_linears(model, layers, format_name)
    schemes = {layer.scheme for layer in layers.values()}
    if len(schemes) > 1:
        labels = sorted(s.label for s in schemes)
        raise ConfigError(
            f"{format_name} stores one bits/group_size for the whole model, but the layers use {', '.join(labels)}. "
            "Re-quantize with one scheme, or export with --format compressed-tensors (one config group per scheme)"
        )
    return next(iter(schemes))


def require_decoder_linears(model: nn.Module, names: Iterable[str], format_name: str) -> None:
    """Refuse unless ``names`` are exactly the model's decoder linears (GPTQ / AWQ loaders quantize all of them)."""
    from ..models.families import decoder_linear_names

    names = list(names)
    expected = decoder_linear_names(model)
    missing = [name for name in expected if name not in names]
    if missing:
        raise ConfigError(
            f"{format_name} loaders quantize every decoder linear, but {len(missing)} are left in float "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}). Quantize all of them (no --exclude / "
            "--targets), or export with --format compressed-tensors, which lists float layers in 'ignore'"
        )
    extra = [name for name in names if name not in set(expected)]
    if extra:
        raise ConfigError(
            f"{format_name} checkpoints quantize decoder linears only, but {', '.join(extra[:3])} is quantized too; "
            "export with --format compressed-tensors (which can hold it) or keep it in float"
        )


def dividing_group_size(in_features: int, group_size: int) -> int:
    """The largest power of two below ``group_size`` that divides ``in_features`` (576 with g128 -> 64)."""
    size = 1
    while size * 2 < group_size and in_features % (size * 2) == 0:
        size *= 2
    return size


def float_tensors(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the quantized layers' buffers (tied weights once, on the CPU).

    The QuantLinears' biases are kept (``<layer>.bias``: every format stores them under that name).
    """
    tensors, _ = dedup_state_dict(model, only_retied=True)
    skip = {f"{name}.{buf}" for name, layer in layers.items() for buf in layer.quantized_weight.tensors()}
    return {name: t.to("cpu") for name, t in tensors.items() if name not in skip}


def write_checkpoint(
    out_dir: str | os.PathLike,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    extra_json: dict[str, dict[str, Any]] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> Path:
    """config.json (with ``quantization_config``), safetensors shards, generation config, tokenizer, extra JSON
    files: all written into a temporary directory that replaces ``out_dir`` only once complete."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    from safetensors.torch import save_file

    config = export_config(model)
    shards = _shard(tensors, max_shard_bytes)
    with atomic_dir(out, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        meta = {"format": "pt", **(metadata or {})}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata=meta)
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for file, content in (extra_json or {}).items():
            (tmp / file).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out.resolve()


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split the tensors, in order, into shards of at most ``max_bytes`` (a bigger single tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    return shards


def holdall_version() -> str:
    import holdall

    return getattr(holdall, "__version__", "unknown")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{directory} has no config.json, so it is not a model directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); re-download or re-export the checkpoint") from exc
    if not isinstance(data, dict) or not isinstance(data.get("quantization_config"), dict):
        raise CorruptFileError(f"{path} has no quantization_config object, so it is not a quantized checkpoint")
    return data


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (via the index when there is one)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(
                f"{index} is not a valid safetensors index ({exc}); re-export the checkpoint"
            ) from exc
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CorruptFileError(f"{directory} has no .safetensors weights; copy them in or re-export the checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise CorruptFileError(f"{index.name} lists {file}, which is missing from {directory}")
        read_safetensors_header(path)
        for name, tensor in load_safetensors(path).items():
            if name in tensors:
                raise CorruptFileError(f"tensor {name!r} appears in more than one shard of {directory}")
            tensors[name] = tensor
    return tensors


def empty_model(directory: Path):
    """The directory's architecture with parameters on the meta device, without its quantization_config."""
    accelerate = require("accelerate", "hf", "Reading quantized checkpoints")
    transformers = require("transformers", "hf", "Reading quantized checkpoints")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    check_supported(config)
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    config.__dict__.pop("quantization_config", None)
    with accelerate.init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(config)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def build_model(
    directory: Path,
    model: nn.Module,
    layers: dict[str, LayerCodes],
    rest: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    format_name: str,
    quantization_config: dict[str, Any],
) -> nn.Module:
    """Swap ``QuantLinear``s into the meta ``model`` for ``layers``, assign them and the ``rest`` of the tensors.

    ``dtype`` casts the float tensors (embeddings, norms, biases, unquantized linears) and is the QuantLinears'
    compute dtype; None keeps the stored dtypes. Quantized codes and scales always keep theirs.
    """
    hint = f"The {format_name} checkpoint {directory} is incomplete or damaged; re-export it"
    for name, codes in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CorruptFileError(
                f"{directory} quantizes {name!r}, which this architecture has no module for"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CorruptFileError(f"{directory} quantizes {name!r}, a {type(linear).__name__}, not a linear layer")
        if (linear.out_features, linear.in_features) != (codes.out_features, codes.in_features):
            raise CorruptFileError(
                f"{name}: the file holds a [{codes.out_features}, {codes.in_features}] weight, the architecture "
                f"needs [{linear.out_features}, {linear.in_features}]. {hint}"
            )
        bias = rest.get(f"{name}.bias")
        bias_dtype = bias.dtype if bias is not None and bias.is_floating_point() else None
        layer_dtype = dtype or bias_dtype or _default_dtype(rest)
        layer = QuantLinear(linear.in_features, linear.out_features, codes.scheme, bias=linear.bias is not None,
                            dtype=layer_dtype, device="meta")
        buffers = QuantizedTensor.from_tensors(codes_to_tensors(codes), (codes.out_features, codes.in_features),
                                               codes.scheme).tensors()
        for buf_name, tensor in buffers.items():
            layer._buffers[buf_name] = tensor
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)

    state = {}
    for name, tensor in rest.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    expected = model.state_dict()
    quant_buffers = {f"{name}.{buf}" for name in layers for buf in model.get_submodule(name).quantized_weight.tensors()}
    expected_rest = {k for k in expected if k not in quant_buffers}
    tied = _tied_targets(model)
    missing = sorted(k for k in expected_rest - state.keys() if k not in tied)
    if missing:
        raise CorruptFileError(f"{directory} lacks tensor(s) {missing[:5]} the model needs. {hint}")
    extra = sorted(state.keys() - expected_rest)
    if extra:
        raise CorruptFileError(
            f"{directory} has tensor(s) {extra[:5]} this holdall model has no place for (a quantized layer the "
            f"{format_name} quantization_config does not describe?). {hint}"
        )
    for name in expected_rest & state.keys():
        if tuple(state[name].shape) != tuple(expected[name].shape):
            raise CorruptFileError(
                f"{directory}: tensor {name!r} has shape {tuple(state[name].shape)}, the model expects "
                f"{tuple(expected[name].shape)}. {hint}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    for target, source in tied.items():
        if target not in state:
            _set_tensor(model, target, _get_tensor(model, source))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CorruptFileError(f"{directory} does not provide {leftover[:5]}. {hint}")
    model.to(device)
    model.eval()
    model.holdall_quant = {
        # no holdall QuantConfig made these codes: record where they came from (model_info shows the method)
        "config": {"method": f"imported:{format_name}", "imported_from": format_name,
                   "quantization_config": quantization_config},
        "layers": {name: codes.scheme.to_dict() for name, codes in layers.items()},
    }
    return model


def _default_dtype(rest: dict[str, torch.Tensor]) -> torch.dtype:
    for tensor in rest.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _tied_targets(model: nn.Module) -> dict[str, str]:
    """``{tied name: source name}`` for the weights transformers ties on load (lm_head -> embedding)."""
    config = model.config
    if not is_tied(config):
        return {}
    family = get_family(config)
    head = model.get_submodule(family.head_path)
    if isinstance(head, QuantLinear):  # a quantized head is its own tensor
        return {}
    return {f"{family.head_path}.weight": f"{family.embed_path}.weight"}


def _get_tensor(model: nn.Module, name: str):
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _set_tensor(model: nn.Module, name: str, value) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(value, nn.Parameter):
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def take(tensors: dict[str, torch.Tensor], name: str, directory: Path, format_name: str) -> torch.Tensor:
    """Pop a tensor the format requires, or say which one is missing."""
    try:
        return tensors.pop(name)
    except KeyError:
        raise CorruptFileError(
            f"{directory} lacks {name!r}, which a {format_name} layer needs; the checkpoint is incomplete or not "
            f"{format_name}"
        ) from None
