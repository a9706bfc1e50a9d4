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
   earlier groups were quantized, so ``o_proj`` sees the attention output of the quantized q/k/v. A Llama-shaped
   layer (``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``, checked against the layer's own forward) is run one
   piece at a time (:class:`_ResidualBlock`): each linear once per window, about one forward of the layer in all.
   Any other layer is re-run from its input for each group, each pass stopping as soon as the group's input was
   seen. The quantized layer's outputs are the next layer's inputs, so the errors of earlier layers are visible
   to later ones (the quantized model is what gets calibrated).
3. **Report.** Per layer: time and the relative error of what the layer adds to the residual stream,
   ``||Y_q - Y_f|| / ||Y_f - X||`` (X its input, Y_f the float layer's output, Y_q the quantized layer's), on the
   first calibration batch (``batch_size`` windows: one float forward of a batch per layer, not of all windows);
   per linear: whatever the quantizer reports; bits per weight overall.

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
        _check_finite(x, name)
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
    # the float layer's outputs on the first batch: the reference the layer's error is measured against
    x_ref = inps[:batch_size]
    y_ref = _output(layer(x_ref, **kwargs))
    if true_sequential and getattr(quantizer, "layer_scope", None) is None:
        block = _ResidualBlock.match(layer, groups)
        if block is not None and block.reproduces(x_ref, kwargs, y_ref):
            block.calibrate(inps, outs, kwargs, quantizer, report, batch_size)
            return _layer_error(x_ref, outs[:batch_size], y_ref)
    # generic path: re-run the layer from its input for every group; each pass stops at the group's input
    first = groups[:1] if true_sequential else groups
    observers, handles = _observe(layer, first, quantizer, stop=true_sequential)
    try:
        _run_layer(layer, inps, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    for group, observer in zip(first, observers):
        _quantize_group(layer, group, observer, quantizer, report)
    for group in groups[len(first) :]:
        (observer,), handles = _observe(layer, [group], quantizer, stop=True)
        try:
            _run_layer(layer, inps, kwargs, batch_size)
        finally:
            for h in handles:
                h.remove()
        _quantize_group(layer, group, observer, quantizer, report)
    _run_layer(layer, inps, kwargs, batch_size, outs)  # the quantized layer's outputs: the next layer's inputs
    return _layer_error(x_ref, outs[:batch_size], y_ref)


def _output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _layer_error(x: torch.Tensor, y_q: torch.Tensor, y_f: torch.Tensor) -> float:
    """``||Y_q - Y_f|| / ||Y_f - X||`` (the quantized layer's error relative to what the float layer adds to the
    residual stream), on the first calibration batch: one float forward of one batch per layer, not of all."""
    diff = float((y_q.double() - y_f.double()).pow(2).sum())
    update = float((y_f.double() - x.double()).pow(2).sum())
    return math.sqrt(diff / update) if update > 0 else 0.0


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise DataError(
            f"the calibration activations entering {name} hold NaN/Inf: an earlier layer overflowed "
            "(float16?) or its weights are broken. Calibrate in float32/bfloat16, or exclude that layer"
        )


class _ResidualBlock:
    """A Llama-shaped decoder layer computed one piece at a time, for true-sequential calibration::

        h = x + attn(norm1(x))      attn's output is o_proj(o_proj's input)
        y = h + mlp(norm2(h))       mlp's output is down_proj(down_proj's input)

    Re-running the layer from its input for every group costs ~2.6 quantized forwards of the layer per
    calibration window (q/k/v; + attention and o; + gate/up; the full layer). Piece by piece, every linear and
    the attention run once per window after the groups before them were quantized, and what later pieces need
    (o_proj's input, the residual ``h``, down_proj's input when it fits in ``_CACHE_BYTES``) is kept: about one
    forward in all, the same statistics up to float summation order. Used only for a layer whose groups are
    [attention inputs], [o_proj], [mlp inputs], [down_proj] under ``self_attn`` / ``mlp`` between the two norms,
    and only after the pieces reproduced the layer's own forward on the first batch (``reproduces``): a layer of
    another shape (Gemma-2's extra norms, a scaled residual) takes the generic path.
    """

    _CACHE_BYTES = 1 << 30

    def __init__(self, layer: nn.Module, groups: list[list[tuple[str, str]]]):
        self.layer, self.groups = layer, groups
        self.o_rel, self.down_rel = groups[1][0][0], groups[3][0][0]

    @classmethod
    def match(cls, layer: nn.Module, groups: list[list[tuple[str, str]]]) -> "_ResidualBlock | None":
        parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        if len(groups) != 4 or not all(isinstance(getattr(layer, p, None), nn.Module) for p in parts):
            return None
        rels = [[rel for rel, _ in g] for g in groups]
        if len(rels[1]) != 1 or len(rels[3]) != 1:
            return None
        if not all(r.startswith("self_attn.") for g in rels[:2] for r in g):
            return None
        if not all(r.startswith("mlp.") for g in rels[2:] for r in g):
            return None
        return cls(layer, groups)

    # the pieces (modules looked up on every call: quantizing a group replaces its linears)
    def _module(self, rel: str) -> nn.Module:
        return self.layer.get_submodule(rel)

    def _input_of(self, call, rel: str) -> torch.Tensor:
        """Run ``call()`` until the linear ``rel`` is reached; its input."""
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise _StopForward

        handle = self._module(rel).register_forward_pre_hook(hook)
        try:
            call()
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ConfigError(f"{rel} was not called by its block; the layer is not Llama-shaped")
        return seen[0]

    def _o_input(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        a = self.layer.input_layernorm(x)
        return self._input_of(lambda: self.layer.self_attn(hidden_states=a, **kwargs), self.o_rel)

    def _down_input(self, h: torch.Tensor) -> torch.Tensor:
        m = self.layer.post_attention_layernorm(h)
        return self._input_of(lambda: self.layer.mlp(m), self.down_rel)

    def _apply(self, rel: str, x: torch.Tensor) -> torch.Tensor:
        return self._module(rel)(x)

    def reproduces(self, x: torch.Tensor, kwargs: dict[str, Any], y_ref: torch.Tensor) -> bool:
        """Do the pieces give the layer's own output ``y_ref`` on ``x``? (float, before anything is quantized; if
        attn's output were not o_proj's, or a norm or a residual were missing, the outputs would differ)"""
        try:
            h = x + self._apply(self.o_rel, self._o_input(x, kwargs))
            y = h + self._apply(self.down_rel, self._down_input(h))
        except Exception:  # any call the pieces cannot make: the generic path will run the layer as it is
            return False
        if y.shape != y_ref.shape or not torch.isfinite(y_ref).all():
            return False  # the generic path names the linear whose input broke
        scale = float(y_ref.abs().max()) or 1.0
        return torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4 * scale)

    def calibrate(self, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict[str, Any], quantizer: LayerQuantizer,
                  report: CalibrationReport, batch_size: int) -> None:
        """Quantize the four groups in order; leave the quantized layer's outputs in ``outs``."""
        g_attn, g_o, g_mlp, g_down = self.groups
        batches = [slice(b0, b0 + batch_size) for b0 in range(0, inps.shape[0], batch_size)]

        def observe(group, inputs) -> None:  # inputs(batch) -> the group's input [b, seq, in]
            name = group[0][1]
            observer = quantizer.observer([n for _, n in group], [self._module(r) for r, _ in group])
            for b in batches:
                x = inputs(b)
                x = x.reshape(-1, x.shape[-1])
                _check_finite(x, name)
                observer.add_batch(x)
            _quantize_group(self.layer, group, observer, quantizer, report)

        # 1. q/k/v read norm1(x): no attention needed
        observe(g_attn, lambda b: self.layer.input_layernorm(inps[b]))
        # 2. o_proj's input: the attention of the quantized q/k/v
        o_in: torch.Tensor | None = None

        def attention(b: slice) -> torch.Tensor:
            nonlocal o_in
            x = self._o_input(inps[b], kwargs)
            if o_in is None:
                o_in = x.new_empty((inps.shape[0],) + tuple(x.shape[1:]))
            o_in[b] = x
            return x

        observe(g_o, attention)
        # 3. gate/up read norm2(h), h = x + o_proj(o_in) (kept in outs)
        def residual(b: slice) -> torch.Tensor:
            outs[b] = inps[b] + self._apply(self.o_rel, o_in[b])
            return self.layer.post_attention_layernorm(outs[b])

        observe(g_mlp, residual)
        del o_in
        # 4. down_proj's input, with the quantized gate/up (kept when it fits)
        cache: torch.Tensor | None = None

        def mlp_inner(b: slice) -> torch.Tensor:
            nonlocal cache
            d = self._down_input(outs[b])
            if cache is None and d.element_size() * d[0].numel() * inps.shape[0] <= self._CACHE_BYTES:
                cache = d.new_empty((inps.shape[0],) + tuple(d.shape[1:]))
            if cache is not None:
                cache[b] = d
            return d

        observe(g_down, mlp_inner)
        # 5. y = h + down_proj(d)
        for b in batches:
            d = cache[b] if cache is not None else self._down_input(outs[b])
            outs[b] += self._apply(self.down_rel, d)


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
