"""State-dict helpers shared by ``save_hf`` and the holdall checkpoint format.

safetensors refuses tensors that share memory, and tied weights (lm_head = embed_tokens) do. Each shared
tensor is therefore stored once; the other names are either re-tied by transformers on load (the names in the
model's ``_tied_weights_keys``) or recorded as aliases by the caller.
"""

from __future__ import annotations

from typing import Any

import torch


def tied_weight_names(model: Any) -> set[str]:
    """Names transformers re-creates by tying on load (``lm_head.weight`` for tied-embedding models).

    transformers 5 stores ``{"lm_head.weight": "model.embed_tokens.weight"}``; 4.x stored a list of names.
    """
    keys = getattr(model, "_tied_weights_keys", None) or {}
    names = set(keys.keys() if isinstance(keys, dict) else keys)
    config = getattr(model, "config", None)
    # Only while the config actually asks for tying: an untied model keeps its own lm_head.
    if config is not None and not getattr(config, "tie_word_embeddings", True):
        return set()
    return names


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def dedup_state_dict(
    model: torch.nn.Module, only_retied: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict with every shared tensor kept once.

    Returns ``(tensors, aliases)`` where ``aliases[dropped] = kept`` for each name left out. A shared tensor
    keeps the name transformers would tie *to* (the embedding), so a plain ``from_pretrained`` re-ties it.
    With ``only_retied`` (plain HF output, which has nowhere to record aliases) only names transformers
    re-ties are dropped; any other duplicate is stored as its own copy.
    Tensors that share only part of a storage (views) are copied, since safetensors cannot express views.
    """
    state = model.state_dict()
    retied = tied_weight_names(model)
    # Visit re-tieable names last, so the other name of each pair is the one kept.
    order = sorted(state, key=lambda name: name in retied)
    seen: dict[tuple, str] = {}
    storages: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name in order:
        tensor = state[name].detach()
        key = _storage_key(tensor)
        if key in seen and (name in retied or not only_retied):
            aliases[name] = seen[key]
            continue
        seen.setdefault(key, name)
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # a partial view of another tensor: store its own copy
        storages[storage] = name
        tensors[name] = tensor
    # Keep the state_dict's order in the file: readers that stream tensors see the model's layout.
    return {name: tensors[name] for name in state if name in tensors}, aliases
