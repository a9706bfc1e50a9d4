"""Model-level LoRA verbs: add, switch, disable, delete, route rows, merge, and report trainable parameters.

Every function works in place on an ordinary ``nn.Module`` (no wrapper model class): targeted linears become
``LoraLinear`` and ``modules_to_save`` become ``ModulesToSave``; the adapters' configs live in
``model.holdall_lora`` (a :class:`LoraState`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError
from holdall.tuners.lora.config import ALL_LINEAR, REGEX_PREFIX, LoraConfig
from holdall.tuners.lora.layer import LINEAR_TYPES, LoraLinear, ModulesToSave, RowGroups

STATE_ATTR = "holdall_lora"
WRAPPERS = (LoraLinear, ModulesToSave)


@dataclass
class LoraState:
    """The adapters a model carries: their configs and which are active."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


# --- walking the model ---------------------------------------------------------------------------------
def _named_targets(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every module by name, not descending into LoRA wrappers (their insides are not user modules)."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        yield full, child
        if not isinstance(child, WRAPPERS):
            yield from _named_targets(child, f"{full}.")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(module path, LoraLinear)`` for every wrapped linear."""
    for name, module in _named_targets(model):
        if isinstance(module, LoraLinear):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | ModulesToSave]]:
    for name, module in _named_targets(model):
        if isinstance(module, WRAPPERS):
            yield name, module


def lora_state(model: nn.Module) -> LoraState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConfigError(
            "this model has no LoRA adapters; call add_lora(model, LoraConfig(...)) or load_adapter first"
        )
    return state


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) or isinstance(module, LoraLinear)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        head = None
    return head.original_module if isinstance(head, ModulesToSave) else head


def _matches_suffix(name: str, suffixes: Sequence[str]) -> bool:
    # "q_proj" matches "model.layers.0.self_attn.q_proj" (and "self_attn.q_proj" does too), never "xq_proj".
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """The module paths a ``LoraConfig.targets`` value selects; every one is a linear layer."""
    modules = list(_named_targets(model))
    if targets == ALL_LINEAR:
        head = _output_head(model)
        # The output head maps to the vocabulary: adapting it is a modules_to_save job, as in PEFT.
        chosen = [n for n, m in modules if _is_linear(m) and m is not head and n.split(".")[-1] != "lm_head"]
    elif isinstance(targets, str) and targets.startswith(REGEX_PREFIX):
        pattern = re.compile(targets[len(REGEX_PREFIX):])
        # A regex easily also matches containers (a whole block); only its linears are meant.
        chosen = [n for n, m in modules if pattern.fullmatch(n) and _is_linear(m)]
    else:
        chosen = []
        for name, module in modules:
            if _matches_suffix(name, targets):
                if not _is_linear(module):
                    raise ConfigError(
                        f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; name linear modules "
                        "such as 'q_proj' or 'mlp.down_proj'"
                    )
                chosen.append(name)
    if not chosen:
        examples = [n for n, m in modules if _is_linear(m)][:6]
        raise ConfigError(
            f"LoRA targets {targets!r} match no linear layer of this model; its linears are named like {examples}"
        )
    return chosen


def _select_modules_to_save(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    chosen = [n for n, _ in _named_targets(model) if _matches_suffix(n, suffixes)]
    missing = [s for s in suffixes if not any(_matches_suffix(n, [s]) for n in chosen)]
    if missing:
        raise ConfigError(f"modules_to_save {missing} match no module of this model; use names such as 'lm_head'")
    return chosen


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


# --- adding adapters -----------------------------------------------------------------------------------
def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"an adapter name must be a non-empty string without '.', got {name!r}")
    state = getattr(model, STATE_ATTR, None)
    if state is not None and name in state.configs:
        raise ConfigError(f"the model already has an adapter named {name!r}; delete_adapter it or choose another name")


def attach_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str,
    paths: Sequence[str],
    ranks: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    save_paths: Sequence[str] = (),
) -> None:
    """Wrap ``paths`` (linears) and ``save_paths`` (modules_to_save) and create adapter ``name`` on them.

    ranks: per-path rank overriding ``config.r`` (adapters saved by PEFT with a rank_pattern). Nothing is
    made trainable or active here; callers decide.
    """
    _check_new_name(model, name)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _set_submodule(model, path, module)
        r = (ranks or {}).get(path, config.r)
        module.add_adapter(name, r, config.alpha, config.dropout, config.use_rslora, dtype)
        # New modules start in training mode; follow the model's, or an eval-mode model would apply dropout.
        module.train(model.training)
    for path in save_paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_submodule(model, path, module)
        module.add_adapter(name)
        module.train(model.training)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = LoraState()
        setattr(model, STATE_ATTR, state)
    state.configs[name] = config


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default", *, dtype: torch.dtype = torch.float32):
    """Add LoRA adapter ``name`` to ``model`` in place and make it the one active, trainable adapter.

    Every other parameter is frozen except the adapter's A/B, its modules_to_save copies, and the biases
    ``config.bias`` names. The adapter starts as an exact no-op (B = 0). dtype: of the adapter weights
    (float32 by default, as PEFT does, also for half-precision or quantized bases). Returns ``model``.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"add_lora needs a LoraConfig, got {type(config).__name__}")
    _check_new_name(model, name)
    paths = select_targets(model, config.targets)
    save_paths = _select_modules_to_save(model, config.modules_to_save)
    overlap = set(paths) & set(save_paths)
    if overlap:
        raise ConfigError(f"modules {sorted(overlap)} are both LoRA targets and modules_to_save; choose one")
    attach_adapter(model, config, name, paths, dtype=dtype, save_paths=save_paths)
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def mark_trainable(model: nn.Module, name: str) -> None:
    """Freeze the whole model, then unfreeze adapter ``name`` (A, B, modules_to_save copies, biases per mode)."""
    config = lora_state(model).configs[name]
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in _wrappers(model):
        for param in module.adapter_parameters(name):
            param.requires_grad_(True)
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and ".modules_to_save." not in pname:
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if name in layer.lora_A and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


# --- switching ------------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one name or several, whose updates add up) the active adapters of every layer.

    Only routing changes; which parameters train is set by add_lora / mark_trainable.
    """
    state = lora_state(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ConfigError(f"no adapter named {unknown}; this model has {sorted(state.configs)}")
    with_copies = [n for n in names if state.configs[n].modules_to_save]
    if len(with_copies) > 1:
        raise ConfigError(
            f"adapters {with_copies} each carry their own modules_to_save copy; only one of them can be active at once"
        )
    for _, module in _wrappers(model):
        module.set_active(names)
    state.active = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(lora_state(model).active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: inside the block no adapter (and no modules_to_save copy) takes part.

    Merged adapters are unmerged on entry and merged again on exit, so the base weights are the original ones.
    """
    wrappers = [m for _, m in _wrappers(model)]
    remerge = []
    for module in wrappers:
        if isinstance(module, LoraLinear) and module.merged_adapters:
            remerge.append((module, list(module.merged_adapters)))
            module.unmerge()
    previous = [m.adapters_disabled for m in wrappers]
    for module in wrappers:
        module.adapters_disabled = True
    try:
        yield
    finally:
        for module, was in zip(wrappers, previous):
            module.adapters_disabled = was
        for module, names in remerge:
            module.merge(names)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, batch row i goes through adapter ``row_adapters[i]`` (None: the base model alone).

    One forward pass serves a mixed batch: each layer gathers the rows of one adapter, runs that adapter on
    them, and adds the result back (``index_select`` / ``index_add``), so the cost is the base pass plus each
    adapter's own rows, not a full pass per adapter.
    """
    state = lora_state(model)
    row_adapters = list(row_adapters)
    unknown = sorted({n for n in row_adapters if n is not None and n not in state.configs})
    if unknown:
        raise ConfigError(f"adapter_rows names unknown adapters {unknown}; this model has {sorted(state.configs)}")
    groups = RowGroups(row_adapters)
    wrappers = [m for _, m in _wrappers(model)]
    for module in wrappers:
        module.row_groups = groups
    try:
        yield
    finally:
        for module in wrappers:
            module.row_groups = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged). Wrappers stay, possibly empty."""
    state = lora_state(model)
    if name not in state.configs:
        raise ConfigError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    merged = [p for p, layer in lora_layers(model) if name in layer.merged_adapters]
    if merged:
        raise ConfigError(f"adapter {name!r} is merged into {merged[0]} (and maybe more); unmerge it before deleting")
    for _, module in _wrappers(model):
        module.delete_adapter(name)
    del state.configs[name]
    state.active = [a for a in state.active if a != name]


# --- merging --------------------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> None:
    """Fold the active adapters into the float base weights in place, reversibly (see :func:`unmerge_adapters`)."""
    _refuse_quantized(model)
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [p for p, layer in lora_layers(model) if layer.is_quantized and layer.active_adapters]
    if quantized:
        scheme = model.get_submodule(quantized[0]).base_layer.scheme.label
        raise ConfigError(
            f"cannot merge LoRA into a quantized base ({len(quantized)} {scheme} layers such as {quantized[0]}): "
            "merge into the float base instead: reload the base unquantized, merge, then quantize once — merging "
            "into a 4-bit base rounds twice (or pass requantize=True to dequantize, merge and re-quantize anyway)"
        )


def merge_lora(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Fold the active adapters into the base and remove every LoRA wrapper; returns the plain model.

    Float bases get ``W + scaling * B @ A`` exactly once. A quantized base is refused (merging into 4-bit
    weights rounds a second time) unless ``requantize=True``: dequantize, merge, re-quantize with the same scheme.
    modules_to_save are replaced by the active adapter's trained copy; if that copy replaced one side of a
    tied pair (lm_head tied to the embeddings), ``config.tie_word_embeddings`` is turned off so saving and
    reloading keep the trained head instead of re-tying it to the embedding.
    """
    if not requantize:
        _refuse_quantized(model)
    untied = False
    for path, module in list(_wrappers(model)):
        if isinstance(module, LoraLinear):
            replacement = module.merged_base(requantize=requantize)
        else:
            replacement = module.active_copy
            if replacement is not module.original_module and _shares_storage(module.original_module, model, path):
                untied = True
        _set_submodule(model, path, replacement)
    if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model


def _shares_storage(module: nn.Module, model: nn.Module, path: str) -> bool:
    """Whether a parameter of ``module`` is also used by another module of ``model`` (weight tying)."""
    own = {p.data_ptr() for p in module.parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not name.startswith(path + ".") and param.data_ptr() in own:
            return True
    return False


# --- reporting ------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of any model; tied tensors count once.

    A quantized weight counts as the number of weights it represents (``in * out``), not its packed bytes:
    holdall's QuantLinear keeps it in buffers, bitsandbytes' ``Params4bit`` packs two 4-bit codes per byte.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        trainable += n if param.requires_grad else 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
    return trainable, total


def _short_count(n: int) -> str:
    """``20_000_000 -> '20M'``, ``6_738_000_000 -> '6.7B'``, ``135_000_000 -> '135M'``."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def _short_percent(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 or p == 0 else f"{p:.2g}"


def trainable_report(model: nn.Module) -> str:
    """Two lines: PEFT's wording, then the short form.

    ``trainable params: 39,976,960 || all params: 6,778,392,576 || trainable%: 0.5898``
    ``trainable: ~40M (0.59%) | total: ~6.8B``
    """
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}\n"
        f"trainable: ~{_short_count(trainable)} ({_short_percent(percent)}%) | total: ~{_short_count(total)}"
    )
