"""The pointwise pieces of a Llama-shaped decoder block, written once as plain torch functions.

transformers' Llama/Mistral/Qwen2 modules compute these inside their ``forward``s; holdall's own fast paths
(static-KV decoding in ``serving.static_decode``, the fused QLoRA step in ``training.fast_step``) call the
projections themselves and need the same arithmetic, in the same precision, outside the modules. Each function
is ``torch.compile``-friendly (one fused kernel per call on CUDA) and differentiable (the training step compiles
forward and backward together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama computes it: in float32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm: ``(x + update, rms_norm(x + update))``."""
    x = x + update
    return x, rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of ``q``/``k`` ``[B, heads, T, d]`` with ``cos``/``sin`` ``[B, T, d]`` (the rotate-half
    convention transformers' Llama uses)."""
    cos, sin = cos[:, None], sin[:, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
