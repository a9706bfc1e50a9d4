"""The sequential calibration engine: quantize a decoder-only model one decoder layer at a time.

How it runs (the GPTQ reference's layer-by-layer scheme, written for transformers 5 decoder layers):

1. **Capture.** Every decoder layer is swapped for a ``_Catcher`` that records its call's keyword arguments
   (attention mask, position embeddings, position ids: whatever the model passes it) and returns its input
   unchanged; the model's forward is stopped at the final norm. The first layer's input is the hidden state
   every later step starts from: ``[n_samples, seq_len, hidden]``. Per-layer kwargs are kept because some
   families give layers different masks (Gemma-2 alternates sliding-window and global attention); they are
   captured with a batch of one and broadcast over any batch.
2. **Per layer**, on ``device`` (only this layer is moved there; everything else stays where it was):
   the linears are grouped by the input they read, in forward order (Llama: ``[q, k, v]``, ``[o]``,
   ``[gate, up]``, ``[down]``). With ``true_sequential`` each group's statistics are collected *after* the
   earlier groups were quantized, so ``o_proj`` sees the attention output of the quantized q/k/v; a group's
   pass stops as soon as its input was seen (the rest of the layer is skipped). The first pass also stores the
   float layer's output. The quantized layer is then re-run: its outputs are the next layer's inputs, so the
   errors of earlier layers are visible to later ones (the quantized model is what gets calibrated).
3. **Report.** Per layer: time and the relative error of what the layer adds to the residual stream,
   ``||Y_q - Y_f|| / ||Y_f - X||`` (X its input, Y_f the float layer's output, Y_q the quantized layer's, all on
   the same calibration inputs); per linear: whatever the quantizer reports; bits per weight overall.

A method plugs in through :class:`LayerQuantizer`: ``observer(names, linears)`` makes a statistics collector fed
with the group's input activations ``[tokens, in_features]``; ``quantize(names, linears, observer)`` returns each
linear's replacement module and a JSON-ready info dict (a group shares its input, so a method may treat it as one
matrix: GPTQ stacks q/k/v into one weight with one Hessian). A method that must see more of the decoder layer than
its linears (AWQ folds scales into the layer's norms and re-runs the attention / MLP block on candidate weights)
may also define ``layer_scope(index, layer)``: a context manager the engine enters around each layer's calibration,
with the layer already on ``device``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..core.linear import QuantLinear
from ..errors import ConfigError, DataError
from ..models.families import Family, get_family
from .config import set_submodule


class Observer(Protocol):
    """Collects statistics of a linear group's input activations."""

    def add_batch(self, x: torch.Tensor) -> None:
        """x: ``[tokens, in_features]`` (a batch of windows, flattened), finite, on the layer's device."""


class LayerQuantizer(Protocol):
    """A calibrated method as the engine sees it."""

    label: str

    def observer(self, names: list[str], linears: list[nn.Linear]) -> Observer:
        """A collector for a group of linears that all read the same input."""

    def quantize(
        self, names: list[str], linears: list[nn.Linear], observer: Observer
    ) -> list[tuple[nn.Module, dict[str, Any]]]:
        """For each linear of the group: the module replacing it and a JSON-ready info dict (errors, notes)."""

    # optional: ``layer_scope(index: int, layer: nn.Module) -> ContextManager``, entered around each decoder
    # layer's calibration (see the module docstring); methods without it (GPTQ) need nothing per layer.


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float | None  # ||Y_q - Y_f|| / ||Y_f - X||; None when nothing in the layer was quantized


@dataclass
class CalibrationReport:
    """What a sequential run did: per layer and per linear, plus totals."""

    method: str
    n_samples: int
    seq_len: int
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)
    linears: dict[str, dict[str, Any]] = field(default_factory=dict)
    bits_per_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def notes(self) -> list[str]:
        """Every per-linear note (e.g. damping raised after a failed Cholesky), prefixed by the linear's name."""
        return [f"{name}: {note}" for name, info in self.linears.items() for note in info.get("notes", ())]

    def format(self) -> str:
        """A few readable lines: the totals, the worst layers, and every note."""
        n = len(self.layers)
        bpw = f", {self.bits_per_weight:.3f} bits/weight" if self.bits_per_weight is not None else ""
        lines = [
            f"{self.method}: {n} decoder layers in {self.seconds:.1f} s ({self.seconds / max(n, 1):.2f} s/layer) "
            f"on {self.n_samples}x{self.seq_len} calibration tokens{bpw}"
        ]
        errors = [(r.rel_error, r.index) for r in self.layers if r.rel_error is not None]
        if errors:
            mean = sum(e for e, _ in errors) / len(errors)
            worst = ", ".join(f"{i}: {e:.4f}" for e, i in sorted(errors, reverse=True)[:3])
            lines.append(f"  layer output rel. error (of the layer's residual update): mean {mean:.4f}; worst {worst}")
        ratios = [
            info["rel_error"] / info["rtn_rel_error"]
            for info in self.linears.values()
            if info.get("rtn_rel_error") and info.get("rel_error") is not None
        ]
        if ratios:
            lines.append(
                f"  linear output error vs round-to-nearest on the same inputs: mean ratio "
                f"{sum(ratios) / len(ratios):.3f}, worst {max(ratios):.3f} ({len(ratios)} linears)"
            )
        lines += [f"  note: {note}" for note in self.notes()]
        return "\n".join(lines)


@dataclass
class SequentialResult:
    report: CalibrationReport
    hidden_states: torch.Tensor  # the last decoder layer's outputs [n_samples, seq_len, hidden] (before the final norm)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (the rest of it is not needed)."""


# --- grouping -------------------------------------------------------------------------------------------
def input_groups(family: Family) -> list[tuple[str, ...]]:
    """The block's linears grouped by the input they read, in forward order.

    Every supported family has the Llama shape: the attention projections but the last read the normed hidden
    state, the last (o_proj) reads the attention output; likewise gate/up then down in the MLP.
    """
    att, mlp = family.attention_linears, family.mlp_linears
    return [group for group in (att[:-1], att[-1:], mlp[:-1], mlp[-1:]) if group]


def _layer_targets(names: list[str], family: Family, n_layers: int) -> dict[int, dict[str, str]]:
    """``{layer index: {name inside the block: full name}}``; refuses names outside the decoder layers."""
    prefix = family.layers_path + "."
    known = set(family.decoder_linears)
    targets: dict[int, dict[str, str]] = {}
    for name in names:
        index, _, rel = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit() or int(index) >= n_layers or rel not in known:
            raise ConfigError(
                f"{name} is not a decoder-layer linear ({', '.join(family.decoder_linears)} under "
                f"{family.layers_path}.<i>); calibrated methods quantize those only. Exclude it "
                "(exclude=[...]) or quantize it separately with rtn"
            )
        targets.setdefault(int(index), {})[rel] = name
    return targets


# --- capture --------------------------------------------------------------------------------------------
class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the call, returns the hidden state unchanged."""

    def __init__(self, layer: nn.Module, index: int, record: dict[str, Any]):
        super().__init__()
        self.layer = layer
        self.index = index
        self.record = record

    def __getattr__(self, name: str) -> Any:
        # the model may read attributes of its layers (Gemma-2: ``attention_type``); answer for the real layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ConfigError(
                f"decoder layer {self.index} is called with positional arguments besides the hidden states; "
                "the sequential engine needs a transformers 5 style layer call (keyword arguments)"
            )
        self.record["kwargs"].setdefault(self.index, kwargs)
        if self.index == 0:
            self.record["hidden"].append(hidden_states.detach())
        return hidden_states


def capture_inputs(
    model: nn.Module, family: Family, ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """First-layer inputs ``[n_samples, seq_len, hidden]`` on ``device`` and each layer's call kwargs.

    Only the modules outside the decoder layers (embeddings, rotary tables) visit ``device``; they go back after.
    """
    layers = model.get_submodule(family.layers_path)
    record: dict[str, Any] = {"kwargs": {}, "hidden": []}
    outer = _outer_modules(model, family)
    homes = [(m, _device_of(m)) for m in outer]
    originals = list(layers)
    stop = _stop_at(model, family.final_norm_path)
    try:
        for m in outer:
            m.to(device)
        for i, layer in enumerate(originals):
            layers[i] = _Catcher(layer, i, record)
        with torch.no_grad():
            for window in ids:  # one window at a time: the recorded kwargs then broadcast over any batch
                try:
                    model(input_ids=window[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        if stop is not None:
            stop.remove()
        for m, home in homes:
            m.to(home)
    hidden = torch.cat(record["hidden"])  # [n, seq_len, hidden]
    if not torch.isfinite(hidden).all():
        raise DataError(
            "the calibration activations entering decoder layer 0 (the embeddings) hold NaN/Inf; the embedding "
            "weights are broken or the dtype overflows: load the model in float32/bfloat16"
        )
    return hidden, [record["kwargs"][i] for i in range(len(originals))]


def _outer_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The children of the decoder-layer list's parent, other than the list itself (embeddings, rotary, norm)."""
    parent_path = family.layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = model.get_submodule(family.layers_path)
    return [child for child in parent.children() if child is not layers]


def _stop_at(model: nn.Module, path: str):
    """A pre-hook that ends the forward at ``path`` (the final norm): the head's logits are not needed."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None

    def stop(*_):
        raise _StopForward

    return module.register_forward_pre_hook(stop)


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# --- running one layer ----------------------------------------------------------------------------------
def _run_layer(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int, out: torch.Tensor | None = None
) -> None:
    """Run ``layer`` over ``hidden [n, seq, h]`` in batches; write into ``out`` if given (a hook may stop early)."""
    for b0 in range(0, hidden.shape[0], batch_size):
        try:
            y = layer(hidden[b0 : b0 + batch_size], **kwargs)
        except _StopForward:
            continue
        if out is not None:
            out[b0 : b0 + batch_size] = y[0] if isinstance(y, tuple) else y


def _observe(
    layer: nn.Module, groups: list[list[tuple[str, str]]], quantizer: LayerQuantizer, stop: bool
) -> tuple[list[Observer], list]:
    """Hook the first linear of each group (the group shares its input); return the observers and hook handles."""
    observers, handles = [], []
    for group in groups:
        rels, names = [r for r, _ in group], [n for _, n in group]
        observer = quantizer.observer(names, [layer.get_submodule(r) for r in rels])
        observers.append(observer)
        handles.append(layer.get_submodule(rels[0]).register_forward_pre_hook(_feed(observer, names[0], stop)))
    return observers, handles


def _feed(observer: Observer, name: str, stop: bool):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])  # [tokens, in_features]
        if not torch.isfinite(x).all():
            raise DataError(
                f"the calibration activations entering {name} hold NaN/Inf: an earlier layer overflowed "
                "(float16?) or its weights are broken. Calibrate in float32/bfloat16, or exclude that layer"
            )
        observer.add_batch(x)
        if stop:
            raise _StopForward

    return hook


def _quantize_group(
    layer: nn.Module,
    group: list[tuple[str, str]],
    observer: Observer,
    quantizer: LayerQuantizer,
    report: CalibrationReport,
) -> None:
    names = [name for _, name in group]
    linears = [layer.get_submodule(rel) for rel, _ in group]
    for linear, name in zip(linears, names):
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized")
    results = quantizer.quantize(names, linears, observer)
    for (rel, name), (module, info) in zip(group, results):
        set_submodule(layer, rel, module)
        report.linears[name] = info


def _calibrate_layer(
    layer: nn.Module,
    groups: list[list[tuple[str, str]]],
    inps: torch.Tensor,
    outs: torch.Tensor,
    kwargs: dict[str, Any],
    quantizer: LayerQuantizer,
    report: CalibrationReport,
    true_sequential: bool,
    batch_size: int,
) -> float | None:
    """Quantize one layer's groups; leave the quantized layer's outputs in ``outs``; return its rel. error."""
    if not groups:
        _run_layer(layer, inps, kwargs, batch_size, outs)
        return None
    # pass 1: the float layer's outputs (the reference), observing the first group (or all of them)
    first = groups[:1] if true_sequential else groups
    observers, handles = _observe(layer, first, quantizer, stop=False)
    try:
        _run_layer(layer, inps, kwargs, batch_size, outs)
    finally:
        for h in handles:
            h.remove()
    for group, observer in zip(first, observers):
        _quantize_group(layer, group, observer, quantizer, report)
    # later groups, each observed with everything before it already quantized; the pass stops at its input
    for group in groups[len(first) :]:
        (observer,), handles = _observe(layer, [group], quantizer, stop=True)
        try:
            _run_layer(layer, inps, kwargs, batch_size)
        finally:
            for h in handles:
                h.remove()
        _quantize_group(layer, group, observer, quantizer, report)
    return _requantized_outputs(layer, inps, outs, kwargs, batch_size)


def _requantized_outputs(
    layer: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict[str, Any], batch_size: int
) -> float:
    """Replace the float outputs in ``outs`` by the quantized layer's; return ||Y_q - Y_f|| / ||Y_f - X||."""
    diff = update = 0.0
    for b0 in range(0, inps.shape[0], batch_size):
        x, y_float = inps[b0 : b0 + batch_size], outs[b0 : b0 + batch_size]
        y = layer(x, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        diff += float((y.double() - y_float.double()).pow(2).sum())
        update += float((y_float.double() - x.double()).pow(2).sum())
        y_float.copy_(y)
    return math.sqrt(diff / update) if update > 0 else 0.0


# --- the engine -----------------------------------------------------------------------------------------
def run_sequential(
    model: nn.Module,
    names: list[str],
    quantizer: LayerQuantizer,
    ids: torch.Tensor,
    *,
    true_sequential: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SequentialResult:
    """Quantize the named decoder linears of ``model`` in place, layer by layer, on calibration ``ids [n, seq]``.

    device: where each decoder layer runs while calibrated (one at a time); None = where the model is.
    """
    family = get_family(model)
    layers = model.get_submodule(family.layers_path)
    targets = _layer_targets(names, family, len(layers))
    device = torch.device(device) if device is not None else _device_of(model)
    report = CalibrationReport(quantizer.label, int(ids.shape[0]), int(ids.shape[1]))
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # dropout would make the statistics random
    try:
        inps = _run_layers(model, family, layers, targets, quantizer, ids, report, true_sequential, batch_size,
                           device, progress)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.bits_per_weight = _bits_per_weight(model, names)
    if progress:
        print(report.format(), file=sys.stderr)
    return SequentialResult(report, inps)


def _run_layers(
    model: nn.Module,
    family: Family,
    layers: nn.ModuleList,
    targets: dict[int, dict[str, str]],
    quantizer: LayerQuantizer,
    ids: torch.Tensor,
    report: CalibrationReport,
    true_sequential: bool,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> torch.Tensor:
    """The per-layer loop of :func:`run_sequential`; returns the last layer's outputs ``[n, seq, hidden]``."""
    with torch.no_grad():
        inps, layer_kwargs = capture_inputs(model, family, ids, device)
        outs = torch.empty_like(inps)
        bar = tqdm(range(len(layers)), desc=quantizer.label, unit="layer", disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            layer = layers[i]
            home = _device_of(layer)
            chosen = targets.get(i, {})
            groups = [[(rel, chosen[rel]) for rel in g if rel in chosen] for g in input_groups(family)]
            layer.to(device)
            scope = getattr(quantizer, "layer_scope", None)
            try:
                with scope(i, layer) if scope is not None else contextlib.nullcontext():
                    rel_error = _calibrate_layer(
                        layer, [g for g in groups if g], inps, outs, layer_kwargs[i], quantizer, report,
                        true_sequential, batch_size,
                    )
            finally:
                layer.to(home)  # also on error: never leave a layer stranded on the accelerator
            if not torch.isfinite(outs).all():
                raise DataError(
                    f"decoder layer {i} ({family.layers_path}.{i}) produced NaN/Inf outputs on the calibration "
                    "data; its weights overflow this dtype or are broken. Calibrate in float32/bfloat16"
                )
            inps, outs = outs, inps
            report.layers.append(LayerReport(i, time.perf_counter() - t0, rel_error))
            if rel_error is not None:
                bar.set_postfix(rel_err=f"{rel_error:.4f}")
    return inps


def _bits_per_weight(model: nn.Module, names: list[str]) -> float | None:
    bits = numel = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            bits += 8 * module.quantized_weight.nbytes
            numel += module.in_features * module.out_features
    return bits / numel if numel else None
