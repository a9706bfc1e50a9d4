"""The LoRA layers: ``LoraLinear`` wraps a float or quantized linear; ``ModulesToSave`` keeps trainable copies.

``LoraLinear`` computes ``y = base(x) + Σ_active (dropout(x) @ A^T @ B^T) * scaling`` with ``A [r, in]`` and
``B [out, r]``. The base layer is any ``nn.Linear`` or holdall ``QuantLinear``: the wrapper only calls it, so the
quantized matmul still goes through ``core.backends`` and a QLoRA backward path registered there applies.

Module and parameter names follow PEFT's in-memory layout (``<path>.base_layer``, ``<path>.lora_A.<adapter>``),
which keeps the mapping to PEFT's saved keys a prefix change (see ``peft_format.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from holdall.core.linear import QuantLinear
from holdall.errors import ConfigError

LINEAR_TYPES = (nn.Linear, QuantLinear)

MERGE_QUANTIZED_HELP = (
    "merge into the float base instead: reload the base unquantized, merge, then quantize once — merging into a "
    "4-bit base rounds twice (or pass requantize=True to dequantize, merge and re-quantize anyway)"
)


class RowGroups:
    """Which batch rows use which adapter: ``[("a", tensor([0, 2])), ("b", tensor([1]))]`` for ``["a", "b", "a"]``.

    Shared by every layer during one ``adapter_rows`` block; the index tensors are moved to each device once.
    """

    def __init__(self, row_adapters: list[str | None]):
        self.batch_size = len(row_adapters)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(row_adapters):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self._cpu = [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in rows.items()]
        self._by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._cpu]

    def on(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The groups with index tensors on ``x``'s device; checks that ``x`` has one row per entry."""
        if x.shape[0] != self.batch_size:
            raise ConfigError(
                f"adapter_rows was given {self.batch_size} row adapters but the batch has {x.shape[0]} rows; "
                "pass one adapter name (or None) per row of the batch"
            )
        groups = self._by_device.get(x.device)
        if groups is None:
            groups = [(name, idx.to(x.device)) for name, idx in self._cpu]
            self._by_device[x.device] = groups
        return groups


class LoraLinear(nn.Module):
    """A linear layer plus any number of named low-rank adapters.

    Only adapters in ``active_adapters`` contribute (and only those that are not merged into the base weight).
    ``adapters_disabled`` turns every adapter off (the base model's output); ``row_groups`` (set by
    ``adapter_rows``) routes each batch row through its own adapter instead of the active set.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise ConfigError(
                f"LoRA wraps nn.Linear or holdall QuantLinear layers, got {type(base_layer).__name__}; "
                "choose linear modules as targets"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()  # adapter -> nn.Linear(in, r, bias=False), weight [r, in]
        self.lora_B = nn.ModuleDict()  # adapter -> nn.Linear(r, out, bias=False), weight [out, r]
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.row_groups: RowGroups | None = None

    # --- the base -------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads ``linear.weight`` (dtype checks, tying); float bases only."""
        if self.is_quantized:
            raise AttributeError("the base of this LoraLinear is a QuantLinear; use base_layer.dequantize_weight()")
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- adapters -------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create adapter ``name``: A Kaiming-uniform (a=√5), B zeros, so the layer's output is unchanged."""
        if name in self.lora_A:
            raise ConfigError(f"this layer already has an adapter named {name!r}; delete it first or pick another name")
        device = _device_of(self.base_layer)
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a=√5); B = 0 makes the step-0 update exactly zero.
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ConfigError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        if name not in self.lora_A:
            return
        del self.lora_A[name]
        del self.lora_B[name]
        del self.scaling[name]
        del self.dropout[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active(self, names: Iterable[str]) -> None:
        # Adapters this layer does not have are simply skipped: an adapter may target only some layers.
        self.active_adapters = tuple(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self.lora_A:
            return []
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    # --- merging --------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` as float32 ``[out, in]``: what merging adds to the base weight."""
        A = self.lora_A[name].weight.detach().float()  # [r, in]
        B = self.lora_B[name].weight.detach().float()  # [out, r]
        return (B @ A) * self.scaling[name]

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Add the adapters' updates into the float base weight (default: the active adapters)."""
        if self.is_quantized:
            raise ConfigError(f"cannot merge LoRA into a quantized ({self.base_layer.scheme.label}) layer: "
                              + MERGE_QUANTIZED_HELP)
        weight = self.base_layer.weight  # [out, in]
        with torch.no_grad():
            for name in self._present(names):
                if name in self.merged_adapters:
                    continue
                # fp32 math, then one rounding to the weight's dtype (half weights would lose the small update)
                weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to float rounding)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))

    def merged_base(self, requantize: bool = False) -> nn.Module:
        """A new base layer with the active adapters folded in (the LoRA layer itself is left untouched).

        Float base: an ``nn.Linear`` with ``W + Σ scaling * B @ A``. Quantized base: refused unless
        ``requantize``, then dequantized to float32, merged and quantized again with the same scheme.
        """
        names = [n for n in self._present(None) if n not in self.merged_adapters]
        if not self.is_quantized:
            self.merge(names)
            self.merged_adapters.clear()  # the weights now belong to the plain layer being returned
            return self.base_layer
        if not requantize:
            raise ConfigError(f"cannot merge LoRA into a quantized ({self.base_layer.scheme.label}) layer: "
                              + MERGE_QUANTIZED_HELP)
        base = self.base_layer
        weight = base.dequantize_weight(torch.float32)  # [out, in]
        for name in names:
            weight = weight + self.delta_weight(name).to(weight.device)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        merged = QuantLinear.from_linear(linear, base.scheme)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        merged.dtype = base.dtype
        return merged

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        result = self.base_layer(x)  # [..., out]
        if self.adapters_disabled:
            return result
        if self.row_groups is not None:
            return self._add_row_deltas(x, result)
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = self._add_delta(x, result, name)
        return result

    def _add_delta(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result + scaling * dropout(x) @ A^T @ B^T``, fused into one ``addmm`` when the dtypes agree."""
        A = self.lora_A[name].weight  # [r, in]
        B = self.lora_B[name].weight  # [out, r]
        h = F.linear(self._adapter_input(x, name, A.dtype), A)  # [..., r]
        if result.dtype != B.dtype:
            return result + (F.linear(h * self.scaling[name], B)).to(result.dtype)
        # addmm(result, h, B^T, alpha=s): the add, the scaling and the second matmul in one kernel; the backward
        # scales only the small [N, r] / [r, out] gradients instead of a full [N, out] activation.
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scaling * dropout(x) @ A^T @ B^T`` alone, ``[..., out]`` (scaling applied on the small rank-r side)."""
        A = self.lora_A[name].weight
        B = self.lora_B[name].weight
        h = F.linear(self._adapter_input(x, name, A.dtype), A)  # [..., r]
        return F.linear(h * self.scaling[name], B)

    def _adapter_input(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        p = self.dropout[name]
        if p > 0 and self.training:  # p == 0 or eval: no dropout kernel, no mask, no copy
            x = F.dropout(x, p, training=True)
        return x if x.dtype == dtype else x.to(dtype)

    def _add_row_deltas(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row group runs through its own adapter only: gather its rows, compute, scatter-add back."""
        if self.merged_adapters:
            raise ConfigError(
                f"adapters {self.merged_adapters} are merged into the base weight, so every row would get them; "
                "unmerge before using adapter_rows"
            )
        for name, rows in self.row_groups.on(x):
            if name not in self.lora_A:
                continue
            delta = self._delta(x.index_select(0, rows), name)  # [n_rows, ..., out]
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    def _present(self, names: Iterable[str] | None) -> list[str]:
        names = self.active_adapters if names is None else tuple(names)
        return [n for n in names if n in self.lora_A]

    def extra_repr(self) -> str:
        ranks = {name: a.out_features for name, a in self.lora_A.items()}
        return f"adapters(rank)={ranks}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


class ModulesToSave(nn.Module):
    """A module trained in full: each adapter gets a private deep copy; the original stays frozen and untouched.

    The copy never shares storage with the original, so training a tied ``lm_head`` leaves the input embedding
    (the same tensor in the original) unchanged, and disabling adapters gives back the base model exactly.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self.row_groups: RowGroups | None = None

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ConfigError(f"this module already has a trainable copy for adapter {name!r}")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = tuple(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    @property
    def active_copy(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        for name in self.active_adapters:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.adapters_disabled:
            return self.original_module(x, *args, **kwargs)
        if self.row_groups is None:
            return self.active_copy(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for name, rows in self.row_groups.on(x):
            if name in self.modules_to_save:
                rows_out = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, rows_out.to(result.dtype))
        return result


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
