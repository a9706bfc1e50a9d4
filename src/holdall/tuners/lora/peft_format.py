"""LoRA adapters in Hugging Face PEFT's on-disk format, both ways, without importing peft.

A directory holds:
    adapter_config.json        PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight``
                               [out, r]; modules_to_save as ``base_model.model.<path>.<param>``; trained biases
    holdall_adapter.json       (holdall only; PEFT never reads it) the base model's fingerprint, so loading onto
                               the wrong base can name the base the adapter was trained for

PEFT's in-memory adapter name (``lora_A.default.weight``) is never part of the saved keys; it is chosen at load time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holdall.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from holdall.fileio import atomic_dir
from holdall.models.files import load_safetensors
from holdall.tuners.lora.config import ALL_LINEAR, REGEX_PREFIX, LoraConfig
from holdall.tuners.lora.layer import LoraLinear, ModulesToSave
from holdall.tuners.lora.model import (
    STATE_ATTR,
    _check_new_name,
    _is_linear,
    _matches_suffix,
    _named_targets,
    attach_adapter,
    lora_layers,
    lora_state,
    mark_trainable,
    set_adapter,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HOLDALL_FILE = "holdall_adapter.json"
KEY_PREFIX = "base_model.model."
HOLDALL_FORMAT = {"format": "holdall-lora", "version": 1}
_FINGERPRINT_FIELDS = (("model_type", "{}"), ("hidden_size", "hidden {}"), ("num_hidden_layers", "{} layers"),
                       ("vocab_size", "vocab {}"))


# --- describing a base -----------------------------------------------------------------------------------
def base_name(model: nn.Module) -> str | None:
    """What PEFT calls base_model_name_or_path: where holdall loaded the model from, else its HF name_or_path."""
    source = getattr(model, "holdall_source", None)
    if source is not None:
        # an alias ("smollm2") is what reloads the same weights in holdall; otherwise the path or hub id itself
        return source.alias or source.location
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The architecture facts an adapter depends on: name, model_type, hidden size, layers, vocabulary."""
    config = getattr(model, "config", None)
    out: dict[str, Any] = {"name": base_name(model)}
    for key, _ in _FINGERPRINT_FIELDS:
        out[key] = getattr(config, key, None)
    return out


def describe_base(fingerprint: dict[str, Any], unnamed: str = "an unnamed base model") -> str:
    """``'smollm2 (llama, hidden 576, 30 layers, vocab 49152)'``."""
    facts = [fmt.format(fingerprint[key]) for key, fmt in _FINGERPRINT_FIELDS if fingerprint.get(key) is not None]
    name = fingerprint.get("name") or unnamed
    return f"{name} ({', '.join(facts)})" if facts else name


def _mismatch(trained_for: dict[str, Any], model: nn.Module, detail: str) -> UnsupportedModelError:
    """trained_for: the recorded fingerprint (or just ``{"name": base_model_name_or_path}`` for PEFT's files)."""
    name = trained_for.get("name") or "an unnamed base model"
    this_model = describe_base(base_fingerprint(model), unnamed="an unnamed model")
    return UnsupportedModelError(
        f"this adapter was trained for {describe_base(trained_for)}; this model is {this_model}: {detail}. "
        f"Load the adapter onto the base it was trained for ({name}), or train a new adapter for this model"
    )


# --- saving ----------------------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module, name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """PEFT's saved keys -> tensors for adapter ``name`` (CPU, contiguous, detached)."""
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        tensors[KEY_PREFIX + key] = tensor.detach().to("cpu").contiguous()

    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            put(f"{path}.lora_A.weight", layer.lora_A[name].weight)  # [r, in]
            put(f"{path}.lora_B.weight", layer.lora_B[name].weight)  # [out, r]
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                put(f"{path}.base_layer.bias", layer.base_layer.bias)
    for path, module in _named_targets(model):
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                put(f"{path}.{key}", tensor)
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and ".modules_to_save." not in pname and ".original_module." not in pname:
                put(pname, param)
    return tensors


def _target_modules_field(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Sorted leaf names of the wrapped linears, as PEFT writes them.

    PEFT applies a name list as suffixes to every module; when that would also select linears this adapter
    does not have (say only layer 0 was adapted), an exact regex over the wrapped paths is written instead.
    """
    leaves = sorted({p.split(".")[-1] for p in wrapped})
    selected = {n for n, m in _named_targets(model) if _is_linear(m) and n.split(".")[-1] in leaves}
    if selected == set(wrapped):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(wrapped)) + ")"


def peft_config_dict(model: nn.Module, name: str) -> dict[str, Any]:
    """adapter_config.json for adapter ``name``: every field PEFT's LoraConfig reads for a plain LoRA."""
    config = lora_state(model).configs[name]
    ranks = {p: layer.lora_A[name].out_features for p, layer in lora_layers(model) if name in layer.lora_A}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name(model),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules_field(model, list(ranks)),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        # modules loaded from a PEFT adapter with its own rank_pattern keep their rank on the way out
        "rank_pattern": {p: r for p, r in ranks.items() if r != config.r},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default", overwrite: bool = True) -> Path:
    """Write adapter ``name`` as a PEFT directory (``peft.PeftModel.from_pretrained`` loads it); returns the path.

    The write is atomic: an interrupted save leaves the previous directory (or nothing).
    """
    from safetensors.torch import save_file

    state = lora_state(model)
    if name not in state.configs:
        raise ConfigError(f"no adapter named {name!r} to save; this model has {sorted(state.configs)}")
    merged = [p for p, layer in lora_layers(model) if name in layer.merged_adapters]
    if merged:
        raise ConfigError(f"adapter {name!r} is merged into the base weights ({merged[0]}, ...); unmerge before saving")
    tensors = _adapter_tensors(model, name, state.configs[name])
    holdall_meta = {
        **HOLDALL_FORMAT,
        "adapter_name": name,
        "config": state.configs[name].to_dict(),
        "base": base_fingerprint(model),
        "modules": {p: [layer.out_features, layer.in_features] for p, layer in lora_layers(model)
                    if name in layer.lora_A},
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config_dict(model, name), indent=2, sort_keys=True) + "\n")
        (tmp / HOLDALL_FILE).write_text(json.dumps(holdall_meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


# --- loading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object; re-save the adapter")
    return data


def _read_adapter_dir(adapter_dir: Path) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"no adapter at {adapter_dir}: expected {CONFIG_FILE} and {WEIGHTS_FILE} (as written by save_adapter or "
            "peft's save_pretrained)"
        )
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        has_bin = (adapter_dir / "adapter_model.bin").exists()
        legacy = " (it has adapter_model.bin: re-save it with safetensors)" if has_bin else ""
        raise ModelNotFoundError(f"{adapter_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE}{legacy}")
    config = _read_json(adapter_dir / CONFIG_FILE)
    meta = _read_json(adapter_dir / HOLDALL_FILE) if (adapter_dir / HOLDALL_FILE).is_file() else None
    return config, meta, load_safetensors(adapter_dir / WEIGHTS_FILE)


def _check_supported_peft(config: dict[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedModelError(
            f"{where} is a {peft_type!r} adapter; holdall loads LoRA adapters (peft_type 'LORA')"
        )
    refusals = {
        "use_dora": "DoRA adapters (use_dora true) are not supported yet; train a plain LoRA adapter",
        "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 style Conv1D layers) are not supported",
        "alpha_pattern": "per-module lora_alpha (alpha_pattern) is not supported yet; use one lora_alpha",
        "layer_replication": "layer_replication adapters are not supported",
        "lora_bias": "lora_bias adapters (a bias on lora_B) are not supported yet",
    }
    for key, message in refusals.items():
        if config.get(key):
            raise UnsupportedModelError(f"{where}: {message}")


def _lora_config_from_peft(config: dict[str, Any], wrapped: list[str]) -> LoraConfig:
    targets = config.get("target_modules")
    if targets is None:  # PEFT's per-architecture default was used; the saved weights say which modules
        targets = tuple(sorted({p.split(".")[-1] for p in wrapped}))
    elif isinstance(targets, str):
        targets = targets if targets == ALL_LINEAR else REGEX_PREFIX + targets
    else:
        targets = tuple(targets)
    try:
        return LoraConfig(
            r=int(config.get("r", 8)),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=targets,
            bias=config.get("bias", "none"),
            use_rslora=bool(config.get("use_rslora", False)),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
        )
    except ConfigError as exc:
        raise CorruptFileError(f"{CONFIG_FILE} holds values holdall cannot use: {exc}") from exc


def _trained_for(config: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
    """The base an adapter was made for: holdall's fingerprint, else PEFT's base_model_name_or_path alone."""
    recorded = dict((meta or {}).get("base") or {})
    recorded.setdefault("name", None)
    recorded["name"] = recorded["name"] or config.get("base_model_name_or_path")
    return recorded


def _check_fingerprint(model: nn.Module, recorded: dict[str, Any]) -> None:
    """Refuse a base whose architecture differs from the one recorded at save time."""
    current = base_fingerprint(model)
    differs = [key for key, _ in _FINGERPRINT_FIELDS
               if recorded.get(key) is not None and current.get(key) is not None and recorded[key] != current[key]]
    if differs:
        detail = ", ".join(f"{k} {recorded[k]} vs {current[k]}" for k in differs)
        raise _mismatch(recorded, model, f"{detail} differ")


def _split_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{path: {"A": [r, in], "B": [out, r]}}`` and the other tensors, keys without the PEFT prefix."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise CorruptFileError(
                f"{WEIGHTS_FILE} key {key!r} does not start with {KEY_PREFIX!r}; not a PEFT LoRA file"
            )
        key = key[len(KEY_PREFIX):]
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            others[key] = tensor
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CorruptFileError(f"{WEIGHTS_FILE} has lora_{next(iter(pair))} but not its partner for {path}")
    return pairs, others


def _check_lora_shapes(
    model: nn.Module, pairs: dict[str, dict[str, torch.Tensor]], trained_for: dict[str, Any]
) -> dict[str, int]:
    """Every adapted module exists, is linear and has the shapes A [r, in] / B [out, r] need; returns ranks."""
    modules = dict(_named_targets(model))
    ranks = {}
    for path, pair in sorted(pairs.items()):
        module = modules.get(path)
        A, B = pair["A"], pair["B"]
        if module is None or not _is_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise _mismatch(trained_for, model, f"the adapter has weights for {path}, and this model has {what}")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CorruptFileError(f"{WEIGHTS_FILE}: {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                   "which are not [r, in] and [out, r]; re-save the adapter")
        if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
            raise _mismatch(
                trained_for, model,
                f"{path} was [out {B.shape[0]}, in {A.shape[1]}] in the adapter's base and is "
                f"[out {module.out_features}, in {module.in_features}] here",
            )
        ranks[path] = int(A.shape[0])
    return ranks


def _resolve_others(
    model: nn.Module, others: dict[str, torch.Tensor], save_paths: list[str], trained_for: dict[str, Any]
) -> list[tuple[str | None, str | nn.Parameter, torch.Tensor]]:
    """Where each non-LoRA tensor goes, checked before the model is touched.

    ``(owner, sub-key, tensor)`` for a modules_to_save tensor (copied into the adapter's copy of ``owner``), or
    ``(None, parameter, tensor)`` for a trained bias of the base.
    """
    params = dict(model.named_parameters())
    plan: list[tuple[str | None, str | nn.Parameter, torch.Tensor]] = []
    for key, tensor in others.items():
        owner = next((p for p in save_paths if key.startswith(p + ".")), None)
        if owner is not None:
            module = model.get_submodule(owner)
            original = module.original_module if isinstance(module, ModulesToSave) else module
            own_state = original.state_dict()
            sub = key[len(owner) + 1:]
            if sub not in own_state or own_state[sub].shape != tensor.shape:
                shape = tuple(own_state[sub].shape) if sub in own_state else "missing"
                raise _mismatch(trained_for, model, f"{key} is {tuple(tensor.shape)} in the adapter and {shape} here")
            plan.append((owner, sub, tensor))
            continue
        # A trained bias: PEFT names a wrapped layer's bias <path>.base_layer.bias; accept <path>.bias too.
        param = params.get(key)
        if param is None and key.endswith(".base_layer.bias"):
            param = params.get(key[: -len("base_layer.bias")] + "bias")
        if param is None and key.endswith(".bias"):
            param = params.get(key[: -len("bias")] + "base_layer.bias")
        if param is None or param.shape != tensor.shape:
            raise _mismatch(trained_for, model, f"the adapter holds {key} {tuple(tensor.shape)}, which this model "
                                                "does not have with that shape")
        plan.append((None, param, tensor))
    return plan


def _assign_others(model: nn.Module, name: str, plan) -> None:
    """Copy modules_to_save tensors into adapter ``name``'s copies and trained biases into the base."""
    with torch.no_grad():
        for owner, target, tensor in plan:
            if owner is None:
                target.copy_(tensor)
            else:
                model.get_submodule(owner).modules_to_save[name].state_dict()[target].copy_(tensor)


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    name: str | None = None,
    *,
    is_trainable: bool = False,
    activate: bool | None = None,
) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by holdall or by peft) into ``model`` as adapter ``name``.

    name: defaults to "default". is_trainable: unfreeze it for further training (else everything stays
    frozen, for inference). activate: make it the active adapter; by default only if no adapter is active yet
    (loading a second adapter for serving does not switch the first one off).
    An adapter made for a different base (another hidden size, layer count, vocabulary, or missing modules)
    raises ``UnsupportedModelError`` naming the base it was trained for. Returns ``model``.
    """
    adapter_dir = Path(adapter_dir)
    name = "default" if name is None else name
    _check_new_name(model, name)
    config, meta, tensors = _read_adapter_dir(adapter_dir)
    _check_supported_peft(config, adapter_dir)
    trained_for = _trained_for(config, meta)
    _check_fingerprint(model, trained_for)
    pairs, others = _split_keys(tensors)
    if not pairs:
        raise CorruptFileError(f"{adapter_dir / WEIGHTS_FILE} holds no lora_A/lora_B weights; re-save the adapter")
    ranks = _check_lora_shapes(model, pairs, trained_for)
    lora_config = _lora_config_from_peft(config, list(pairs))
    # Like peft, a modules_to_save name this model lacks is skipped; tensors saved for it are refused below.
    save_paths = [n for n, _ in _named_targets(model) if _matches_suffix(n, lora_config.modules_to_save)]
    plan = _resolve_others(model, others, save_paths, trained_for)
    had_active = bool(getattr(model, STATE_ATTR, None) and lora_state(model).active)

    attach_adapter(model, lora_config, name, sorted(pairs), ranks=ranks, save_paths=save_paths)
    with torch.no_grad():
        for path, pair in pairs.items():
            layer: LoraLinear = model.get_submodule(path)
            layer.lora_A[name].weight.copy_(pair["A"])
            layer.lora_B[name].weight.copy_(pair["B"])
    _assign_others(model, name, plan)

    if activate or (activate is None and not had_active):
        set_adapter(model, name)
    if is_trainable:
        mark_trainable(model, name)
    else:
        for _, module in _named_targets(model):
            if isinstance(module, (LoraLinear, ModulesToSave)):
                for param in module.adapter_parameters(name):
                    param.requires_grad_(False)
    return model


__all__ = ["base_fingerprint", "describe_base", "load_adapter", "peft_config_dict", "save_adapter"]
