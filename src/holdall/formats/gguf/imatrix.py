"""Importance matrices for GGUF encoding, computed by holdall from activations on calibration text.

What llama.cpp's ``llama-imatrix`` tool stores, measured in torch on the Hugging Face model: for every decoder
linear, the mean over calibration tokens of each input column's squared activation (``Σ x_j² / n_tokens``),
keyed by the GGUF tensor name (``blk.3.ffn_down.weight``). The encoders (``quants.quantize(..., imatrix)``)
then weight each element's rounding error by its column's importance, as llama-quantize --imatrix does; with
the same importances the bytes are llama.cpp's (tests/test_gguf_quants_*).

The q/k row permutation llama.cpp expects reorders output rows only, so input-column importances need no
permutation.
"""

from __future__ import annotations

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


@torch.no_grad()
def collect_imatrix(
    model: nn.Module, tokenizer, text: str, n_ctx: int = 512, max_chunks: int | None = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """``{gguf tensor name: float32 [in_features]}``: mean squared input activation per column."""
    names = _linear_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(gguf_name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in_features]
            if not torch.isfinite(x).all():
                raise DataError(f"the calibration activations entering {gguf_name} hold NaN/Inf; check the model")
            sums[gguf_name] = sums.get(gguf_name, 0) + x.double().pow(2).sum(dim=0)
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return hook

    handles = [model.get_submodule(hf).register_forward_pre_hook(hook_for(g)) for hf, g in names.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(_chunks(tokenizer, text, n_ctx, max_chunks), desc="imatrix", unit="chunk", disable=not progress):
            model(chunk.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (sums[name] / counts[name]).float().cpu().numpy() for name in sums}
