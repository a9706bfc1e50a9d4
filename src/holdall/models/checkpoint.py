"""holdall's own checkpoint: a quantized model as safetensors + ``holdall_quant.json``, loadable bit-exactly.

Directory layout (written in one atomic step, so a crash never leaves half a checkpoint)::

    config.json            the Hugging Face config: rebuilds the architecture
    holdall_model.safetensors  the full state_dict: QuantLinear buffers (qdata, scale, zero, ...) + float tensors,
                           each shared (tied) tensor stored once
    holdall_quant.json     format + version, the QuantConfig, every quantized layer's scheme, tied aliases
    generation_config.json, tokenizer files   when present

Loading builds the architecture with its parameters on the meta device (no float weights are allocated for
layers that are about to become QuantLinear), swaps in QuantLinear shells, then assigns the stored tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holdall.core.linear import QuantLinear
from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError, CorruptFileError, HoldallError, UnsupportedModelError, require
from holdall.fileio import atomic_dir
from holdall.models.families import check_supported
from holdall.models.files import load_safetensors
from holdall.models.loading import (
    HOLDALL_MARKER,
    ModelSource,
    export_config,
)
from holdall.models.state import dedup_state_dict

FORMAT_NAME = "holdall-quant"
FORMAT_VERSION = 1
# Not "model.safetensors": plain transformers must not mistake this directory for a float checkpoint and
# silently initialise the quantized linears at random; it finds no weights file and says so instead.
WEIGHTS_FILE = "holdall_model.safetensors"

_REEXPORT = "Re-export it with holdall (save_quantized / holdall quantize --out DIR)."


def _holdall_version() -> str:
    import holdall

    return getattr(holdall, "__version__", "unknown")


def _quant_record(model: nn.Module) -> dict[str, Any]:
    record = getattr(model, "holdall_quant", None)
    if not record or not isinstance(record, dict) or "layers" not in record:
        raise ConfigError(
            "this model is not quantized (it has no holdall_quant record); quantize it first with "
            "holdall.quantize(model, QuantConfig(...)), or save a float model with holdall.save_hf"
        )
    modules = dict(model.named_modules())
    for name in record["layers"]:
        if not isinstance(modules.get(name), QuantLinear):
            raise ConfigError(
                f"model.holdall_quant lists {name!r}, but that module is "
                f"{type(modules.get(name)).__name__ if name in modules else 'missing'}, not a QuantLinear; "
                "the record is stale: re-run holdall.quantize on the float model"
            )
    return record


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model (and its tokenizer, unless None) to ``out_dir``; return the directory.

    ``overwrite=False`` refuses an existing ``out_dir``; with ``overwrite=True`` it is replaced only once the
    new directory is complete.
    """
    record = _quant_record(model)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    from safetensors.torch import save_file

    tensors, aliases = dedup_state_dict(model)
    tensors = {name: t.to("cpu") for name, t in tensors.items()}
    modules = dict(model.named_modules())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "holdall_version": _holdall_version(),
        "config": record.get("config"),
        "layers": record["layers"],
        # the float dtype each QuantLinear computes/dequantizes in (not derivable from a bias-less layer's buffers)
        "layer_dtypes": {name: str(modules[name].dtype).removeprefix("torch.") for name in record["layers"]},
        # state_dict names stored once under another name: {dropped: kept}; re-tied on load
        "aliases": aliases,
        "weights": WEIGHTS_FILE,
    }
    config = export_config(model)
    with atomic_dir(out, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "holdall": FORMAT_NAME})
        (tmp / HOLDALL_MARKER).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out.resolve()


# ---------------------------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``holdall_quant.json``."""
    path = Path(directory) / HOLDALL_MARKER
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing, so {directory} is not a holdall checkpoint. {_REEXPORT}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}). {_REEXPORT}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptFileError(f"{path} does not describe a {FORMAT_NAME!r} checkpoint. {_REEXPORT}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedModelError(
            f"{path} is format version {version!r} (written by holdall {manifest.get('holdall_version')}); this "
            f"holdall reads up to version {FORMAT_VERSION}. Upgrade: pip install -U holdall"
        )
    if not isinstance(manifest.get("layers"), dict):
        raise CorruptFileError(f"{path} has no 'layers' mapping. {_REEXPORT}")
    return manifest


def _empty_model(config):
    """The architecture with parameters on the meta device and real non-persistent buffers (rotary tables)."""
    accelerate = require("accelerate", "hf", "Loading holdall checkpoints")
    transformers = require("transformers", "hf", "Loading holdall checkpoints")
    with accelerate.init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(config)


def _swap_in_quant_linears(model: nn.Module, manifest: dict[str, Any], stored: dict[str, torch.Tensor]) -> None:
    dtypes = manifest.get("layer_dtypes", {})
    for name, scheme_dict in manifest["layers"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CorruptFileError(
                f"holdall_quant.json lists layer {name!r}, which this architecture does not have. {_REEXPORT}"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CorruptFileError(
                f"holdall_quant.json lists {name!r}, which is a {type(linear).__name__}, not a linear layer. "
                + _REEXPORT
            )
        try:
            scheme = QuantScheme.from_dict(scheme_dict)
        except HoldallError as exc:
            raise CorruptFileError(
                f"holdall_quant.json: the scheme of {name!r} is invalid ({exc}). {_REEXPORT}"
            ) from exc
        bias = stored.get(f"{name}.bias")
        dtype = getattr(torch, dtypes.get(name, ""), None) or (bias.dtype if bias is not None else torch.float32)
        layer = QuantLinear(
            linear.in_features, linear.out_features, scheme, bias=linear.bias is not None, dtype=dtype, device="meta"
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _check_tensors(expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], weights: Path) -> None:
    """Strict key and shape check, naming the first offending tensors (load_state_dict's text is a wall)."""

    def some(names) -> str:
        names = sorted(names)
        return ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    missing = expected.keys() - stored.keys()
    if missing:
        raise CorruptFileError(f"{weights} lacks tensor(s) {some(missing)} that the model needs. {_REEXPORT}")
    extra = stored.keys() - expected.keys()
    if extra:
        raise CorruptFileError(
            f"{weights} has unexpected tensor(s) {some(extra)} that the model has no place for. {_REEXPORT}"
        )
    for name, want in expected.items():
        got = stored[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CorruptFileError(
                f"{weights}: tensor {name!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}. "
                f"{_REEXPORT}"
            )


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each aliased name the *same* Parameter/buffer object as the name it was stored under."""
    for dropped, kept in aliases.items():
        kept_owner, _, kept_attr = kept.rpartition(".")
        owner_name, _, attr = dropped.rpartition(".")
        source = model.get_submodule(kept_owner)
        target = model.get_submodule(owner_name)
        if kept_attr in source._parameters:
            target._parameters[attr] = source._parameters[kept_attr]
        else:
            target._buffers[attr] = source._buffers[kept_attr]


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a directory written by :func:`save_quantized`; return ``(model, tokenizer)`` (tokenizer may be None).

    Logits are bit-identical to the model that was saved.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    transformers = require("transformers", "hf", "Loading holdall checkpoints")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    check_supported(config)

    weights = directory / manifest.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise CorruptFileError(f"{weights} is missing from the holdall checkpoint {directory}. {_REEXPORT}")
    stored = load_safetensors(weights, device=str(device))
    aliases = manifest.get("aliases", {})
    for dropped, kept in aliases.items():
        if kept not in stored:
            raise CorruptFileError(f"{weights} lacks tensor {kept!r} (the stored copy of {dropped!r}). {_REEXPORT}")
        stored[dropped] = stored[kept]

    model = _empty_model(config)
    _swap_in_quant_linears(model, manifest, stored)
    _check_tensors(model.state_dict(), stored, weights)
    model.load_state_dict(stored, strict=True, assign=True)
    _retie(model, aliases)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a tensor that is neither stored nor computed at construction: never leave it silently empty
        raise CorruptFileError(f"{weights} does not provide {leftover[:5]}. {_REEXPORT}")

    model.to(device)
    model.eval()
    model.holdall_quant = {"config": manifest.get("config"), "layers": dict(manifest["layers"])}
    model.holdall_source = ModelSource("holdall", str(directory.resolve()), str(directory))
    tokenizer = None
    if any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer


