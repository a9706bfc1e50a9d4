"""Importance matrices for GGUF encoding, computed by holdall from activations on calibration text.

What llama.cpp's ``llama-imatrix`` tool stores, measured in torch on the Hugging Face model: for every decoder
linear, the mean over calibration tokens of each input column's squared activation (``Σ x_j² / n_tokens``),
keyed by the GGUF tensor name (``blk.3.ffn_down.weight``). The encoders (``quants.quantize(..., imatrix)``)
then weight each element's rounding error by its column's importance, as llama-quantize --imatrix does; with
the same importances the bytes are llama.cpp's (tests/test_gguf_quants_*).

The q/k row permutation llama.cpp expects reorders output rows only, so input-column importances need no
permutation.

``collect_statistics(..., hessians=True)`` also accumulates each linear's full input Hessian ``H = Σ xᵀx / n``
(``[in, in]``; its diagonal is the importance above) for ``formats.gguf.refine``'s error feedback. Linears fed the
same activation (q/k/v, gate/up) share one matrix, and a linear wider than ``max_hessian_columns``, or one that
would push the total past ``hessian_budget_bytes``, keeps only its diagonal (the refiner then falls back to the
imatrix encoder for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...errors import DataError
from ...models.families import check_supported
from .convert import BLOCK_TENSORS


def _linear_names(model: nn.Module) -> dict[str, str]:
    """HF module path -> GGUF tensor name for every decoder linear (norms are not matmuls: skipped)."""
    family = check_supported(model.config)
    names = {}
    for i, _ in enumerate(model.get_submodule(family.layers_path)):
        for hf_name, gguf_name in BLOCK_TENSORS:
            if "norm" not in gguf_name:
                names[f"{family.layers_path}.{i}.{hf_name}"] = f"blk.{i}.{gguf_name}.weight"
    return names


def _chunks(tokenizer, text: str, n_ctx: int, max_chunks: int | None) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = len(ids) // n_ctx if max_chunks is None else min(len(ids) // n_ctx, max_chunks)
    if n == 0:
        raise DataError(f"the calibration text has {len(ids)} tokens, fewer than one {n_ctx}-token chunk")
    return [ids[c * n_ctx:(c + 1) * n_ctx][None] for c in range(n)]


def collect_imatrix(
    model: nn.Module, tokenizer, text: str, n_ctx: int = 512, max_chunks: int | None = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """``{gguf tensor name: float32 [in_features]}``: mean squared input activation per column."""
    return collect_statistics(model, tokenizer, text, n_ctx, max_chunks, progress).imatrix


@dataclass
class CalibrationStats:
    """What one calibration pass measured, keyed by GGUF tensor name.

    imatrix: mean x² per input column (llama-imatrix's information), every decoder linear.
    hessians: mean xᵀx, float32 ``[in, in]``, for the linears that got one (linears reading the same input
        share the same array object).
    notes: linears left with the diagonal only, and why.
    """

    imatrix: dict[str, np.ndarray]
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    tokenizer,
    text: str,
    n_ctx: int = 512,
    max_chunks: int | None = 64,
    progress: bool = True,
    hessians: bool = False,
    max_hessian_columns: int = 8192,
    hessian_budget_bytes: int = 4 << 30,
) -> CalibrationStats:
    """One pass over ``max_chunks`` chunks of ``n_ctx`` tokens: importances, and with ``hessians`` the full
    input Hessians of the linears that fit the limits (float32, 4·in² bytes each, shared between linears that
    read the same activation)."""
    if max_hessian_columns < 1 or hessian_budget_bytes < 0:
        raise DataError("max_hessian_columns must be >= 1 and hessian_budget_bytes >= 0")
    names = _linear_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    full: dict[str, torch.Tensor] = {}  # owner name -> running Σ xᵀx (float32)
    owner_of: dict[str, str | None] = {}  # linear -> the linear whose Hessian it shares; None = diagonal only
    last_input: dict[str, torch.Tensor] = {}  # owner -> the activation it saw in the current chunk
    notes: list[str] = []
    budget = [hessian_budget_bytes]

    def owner_for(gguf_name: str, x: torch.Tensor) -> str | None:
        # Decided on the first chunk: the same tensor object as an earlier linear's input means the same Hessian.
        for owner, seen in last_input.items():
            if seen is x:
                return owner
        width = x.shape[-1]
        need = 4 * width * width
        if width > max_hessian_columns:
            notes.append(f"{gguf_name}: {width} input columns > max_hessian_columns={max_hessian_columns}; "
                         "diagonal importance only")
            return None
        if need > budget[0]:
            notes.append(f"{gguf_name}: its {need / 2**20:.0f} MiB Hessian would exceed hessian_budget_bytes; "
                         "diagonal importance only")
            return None
        budget[0] -= need
        full[gguf_name] = torch.zeros(width, width, dtype=torch.float32)
        return gguf_name

    def hook_for(gguf_name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in_features]
            if not torch.isfinite(x).all():
                raise DataError(f"the calibration activations entering {gguf_name} hold NaN/Inf; check the model")
            sums[gguf_name] = sums.get(gguf_name, 0) + x.double().pow(2).sum(dim=0)
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
            if not hessians:
                return
            if gguf_name not in owner_of:
                owner_of[gguf_name] = owner_for(gguf_name, args[0])
            owner = owner_of[gguf_name]
            if owner is None:
                return
            if owner == gguf_name:
                full[owner].addmm_(x.T.cpu(), x.cpu())
                last_input[owner] = args[0]
            elif last_input.get(owner) is not args[0]:
                raise DataError(f"{gguf_name} shared {owner}'s input on the first chunk but not later; cannot "
                                "share their Hessian (does the model's forward change between calls?)")
        return hook

    handles = [model.get_submodule(hf).register_forward_pre_hook(hook_for(g)) for hf, g in names.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # The decoder stack alone: the statistics are of the linears inside it, and the LM head's logits (a large
    # share of a small model's forward: 49k x 576 per token for SmolLM2) would be computed only to be dropped.
    body = getattr(model, "base_model", model)
    try:
        for chunk in tqdm(_chunks(tokenizer, text, n_ctx, max_chunks), desc="imatrix", unit="chunk", disable=not progress):
            body(chunk.to(device), use_cache=False)
            last_input.clear()  # only identity within one forward pass means "the same activation"
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    imatrix = {name: (sums[name] / counts[name]).float().cpu().numpy() for name in sums}
    means = {owner: (h / counts[owner]).numpy() for owner, h in full.items()}
    shared = {name: means[owner] for name, owner in owner_of.items() if owner is not None}
    return CalibrationStats(imatrix, shared, notes)
