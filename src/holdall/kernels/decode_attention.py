"""One decode step of attention over a static KV cache, fused: rotary on the new q/k, the new k/v written into
the cache, attention of every query head over the slots written so far, the heads laid out for ``o_proj``.

Why: a batch-1 decode step of a Llama-shaped model spends ~20 µs per layer outside its projections when these
pieces run as separate kernels (the rotary table, two ``index_copy_``, a boolean mask turned into an additive
one, SDPA over the whole cache, a transpose copy; H200, ``bench/decode_profile.py``) -- as long as two of its
seven 4-bit GEMVs. :class:`DecodeAttention` does it in one launch (``triton_attention``), reading only the
slots up to the current position, split over the cache so that all SMs stream it (flash-decoding).

:func:`decode_attention_reference` is the same step in plain torch (the CPU path, and what the kernel is tested
against). Shapes (one layer, batch 1, ``H`` query heads, ``H_kv`` kv heads, head size ``D``):

* ``q [H * D]``, ``k [H_kv * D]``, ``v [H_kv * D]``: the projections' outputs, before rotary;
* ``k_cache``, ``v_cache`` ``[H_kv, max_len, D]``: written at ``position`` (in place);
* ``position``: a one-element integer tensor on the device (a CUDA graph replays it with new values);
* ``cos``, ``sin`` ``[max_len, D]``: the model's rotary table for every position (rotate-half convention),
  in the compute dtype, as transformers' rotary module returns it;
* returns ``[H * D]`` in ``q``'s dtype: head ``h``'s output at ``h * D``, ready for ``o_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of ``x [heads, D]`` by one position's ``cos``/``sin [D]`` (transformers' Llama)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """The plain-torch decode step (see the module docstring for shapes); writes the cache, returns ``[H * D]``."""
    n_kv, max_len, d = k_cache.shape
    n_heads = q.numel() // d
    c, s = cos[position.reshape(1)], sin[position.reshape(1)]  # [1, D]
    qh = _rotate(q.reshape(n_heads, d), c, s)
    kh = _rotate(k.reshape(n_kv, d), c, s)
    k_cache.index_copy_(1, position.reshape(1), kh[:, None].to(k_cache.dtype))
    v_cache.index_copy_(1, position.reshape(1), v.reshape(n_kv, 1, d).to(v_cache.dtype))
    mask = torch.arange(max_len, device=k_cache.device)[None] <= position.reshape(1, 1)  # [1, max_len]
    out = F.scaled_dot_product_attention(qh[None, :, None], k_cache[None], v_cache[None], attn_mask=mask,
                                         scale=scale, enable_gqa=n_kv != n_heads)  # [1, H, 1, D]
    return out.reshape(n_heads * d)


@dataclass
class DecodeAttention:
    """The fused decode-attention step of one model, planned once (the CUDA graph reads its buffers).

    n_heads, n_kv, head_dim, max_len: the model's attention shape and the cache length.
    device, dtype: where and in what the step runs.
    splits: programs per kv head that share the written slots (flash-decoding); ``None`` picks about one
        program per SM. On CUDA with Triton the step is one Triton launch, else :func:`decode_attention_reference`.
    pdl: launch it with programmatic dependent launch (``None``: on Hopper or newer unless ``HOLDALL_PDL=0``), so
        that it starts before the q/k/v GEMV ends and the o_proj GEMV loads its weights while it runs.
    """

    n_heads: int
    n_kv: int
    head_dim: int
    max_len: int
    device: torch.device
    dtype: torch.dtype
    splits: int | None = None
    use_triton: bool | None = None
    pdl: bool | None = None
    _partials: torch.Tensor | None = field(default=None, init=False, repr=False)  # the kernel's workspace
    _counters: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.n_heads % self.n_kv:
            raise ValueError(f"{self.n_heads} query heads do not share {self.n_kv} kv heads evenly")
        if self.head_dim % 2:
            raise ValueError(f"rotary needs an even head size, got {self.head_dim}")
        self.device = torch.device(self.device)
        if self.use_triton is None:
            self.use_triton = self.device.type == "cuda" and triton_fits(self.head_dim, self.n_heads // self.n_kv)
        if self.use_triton:
            from . import triton_attention  # first use: only now is Triton imported

            self.splits = triton_attention.default_splits(self) if self.splits is None else int(self.splits)
            self.pdl = triton_attention.programmatic_launch(self) if self.pdl is None else bool(self.pdl)
            self._partials, self._counters = triton_attention.workspace(self)

    def __call__(self, q, k, v, k_cache, v_cache, position, cos, sin, scale: float | None = None) -> torch.Tensor:
        if not self.use_triton:
            return decode_attention_reference(q, k, v, k_cache, v_cache, position, cos, sin, scale)
        from . import triton_attention

        scale = self.head_dim ** -0.5 if scale is None else float(scale)
        return triton_attention.decode_attention(self, q, k, v, k_cache, v_cache, position, cos, sin, scale)


def triton_fits(head_dim: int, group: int) -> bool:
    """Whether the Triton kernel takes this shape: a power-of-two head size 16..256, at most 64 query heads per
    kv head (one tile holds a kv head's queries)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and group <= 64
