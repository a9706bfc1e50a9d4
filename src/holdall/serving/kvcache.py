"""The running batch's KV cache, and the splices continuous batching needs.

Rows are left-padded: every row's newest token sits in the last column, so one decode step feeds one token per
row. ``attention_mask [B, T]`` marks real (1) and padding (0) columns; the model never attends to padding, and
each row's position ids count only its real tokens, so a row computes what it would compute alone.

Three splices keep the batch dense:
* ``select_rows``: finished rows leave;
* ``concat``: freshly prefilled rows join (the shorter side gets more left padding);
* ``trim_left``: columns that are padding in every row (left behind by rows that left) are dropped.

The cache is a transformers ``DynamicCache`` built without a config, so every layer is a plain ``DynamicLayer``
holding ``keys`` / ``values`` ``[B, kv_heads, T, head_dim]`` that can be spliced along B and T. (With a config,
sliding-window layers would keep only the window, which cannot be spliced; the sliding window itself is still
applied through the attention mask, which transformers builds from ``config.sliding_window``.)
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def cache_kwarg(model) -> str:
    """The forward argument that takes the cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layers(cache) -> list:
    # layers that were never filled (KV sharing between layers) hold no tensors and are left alone
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def select_rows(cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only batch rows ``rows`` (a long tensor of indices); returns the matching mask."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return mask.index_select(0, rows.to(mask.device))


def _pad_left(tensor: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards
    pad = [0, 0] * (tensor.ndim - 1 - dim % tensor.ndim) + [n, 0]
    return F.pad(tensor, pad)


def concat(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place); the shorter side is left-padded. Returns the new mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    total = max(length, other_length)
    mine, theirs = _layers(cache), _layers(other)
    if len(mine) != len(theirs):
        raise RuntimeError(f"cannot join KV caches with {len(mine)} and {len(theirs)} filled layers")
    for layer, new in zip(mine, theirs):
        # keys / values [B, H, T, D]: time is dim 2
        layer.keys = torch.cat([_pad_left(layer.keys, total - length, 2), _pad_left(new.keys, total - other_length, 2)])
        layer.values = torch.cat([_pad_left(layer.values, total - length, 2),
                                  _pad_left(new.values, total - other_length, 2)])
    return torch.cat([_pad_left(mask, total - length, 1), _pad_left(other_mask, total - other_length, 1)])


def trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row; returns the trimmed mask."""
    real_columns = mask.any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else mask.shape[1]
    if start == 0:
        return mask
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    return mask[:, start:]
