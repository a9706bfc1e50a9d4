"""Triton kernel of :mod:`holdall.kernels.decode_attention`: one launch per layer and decode step.

Grid ``(kv heads, splits)``. Program ``(g, s)`` holds kv head ``g``'s query heads as one ``[BLOCK_G, D]`` tile
(GQA: the cache is read once for all of them; padded to the MMA's 16 rows), rotates them and the new key by the
position's row of the rotary table, and attends over its share of the slots ``0..position``: the slots are cut
into ``splits`` chunks *at run time* (the position lives on the device), so every program streams an even share
whatever the position (and no more programs than ``BLOCK_N``-slot tiles: early in a sequence one program
reads every slot and writes the output directly). The chunk that holds ``position`` writes the new key/value into
the cache and uses them from registers (no other program reads that slot, so no ordering between programs is needed). Each program
keeps an online softmax (running max, sum, ``[BLOCK_G, D]`` float32 sum of values); with more than one split it
stores them, and the kv head's last program in (an atomic counter, put back to zero afterwards) combines the
splits in the fixed order ``0..splits-1`` (deterministic) and writes the heads' outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_wq4 import _sm_count  # one cached SM count per device for every kernel

_LOG2E = 1.4426950408889634
BLOCK_N = 64  # cache slots per inner iteration


@triton.jit
def _rotated(ptr, rows, row_ok, c, s, D: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` of ``[rows, D]`` read at ``ptr + row * D``, rounded like the input."""
    rd = tl.arange(0, D)
    partner = (rd + D // 2) % D
    sign = tl.where(rd < D // 2, -1.0, 1.0)
    x = tl.load(ptr + rows[:, None] * D + rd[None, :], mask=row_ok[:, None], other=0.0)
    xp = tl.load(ptr + rows[:, None] * D + partner[None, :], mask=row_ok[:, None], other=0.0)
    out = x.to(tl.float32) * c[None, :] + sign[None, :] * xp.to(tl.float32) * s[None, :]
    return out.to(x.dtype)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, sem_ptr,
    stride_kh, stride_kn, stride_vh, stride_vn, scale_log2,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch: q/k/v and the cache are the previous kernels' -- wait for them,
        # then let the next kernel (o_proj's GEMV) start loading its weights beside this one
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.program_id(0)
    split = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    rd = tl.arange(0, D)
    rg = tl.arange(0, BLOCK_G)
    g_ok = rg < GROUP
    c = tl.load(cos_ptr + pos * D + rd).to(tl.float32)
    s = tl.load(sin_ptr + pos * D + rd).to(tl.float32)
    q = _rotated(q_ptr, g * GROUP + rg, g_ok, c, s, D)  # [BLOCK_G, D]
    one = tl.arange(0, 1)
    k_new = _rotated(k_ptr, g + one, one == 0, c, s, D)  # [1, D]
    v_new = tl.load(v_ptr + g * D + rd)[None, :]
    # the slots 0..pos in whole BLOCK_N tiles, shared evenly by the first `active` programs (no more programs than
    # tiles: early in a sequence one program does it all and writes the output without a combine)
    tiles = tl.cdiv(pos + 1, BLOCK_N)
    active = tl.minimum(tiles, SPLITS)
    chunk = tl.cdiv(tiles, active) * BLOCK_N
    if split < active:
        lo = split * chunk
        hi = tl.minimum(lo + chunk, pos + 1)
        kc = kc_ptr + g * stride_kh
        vc = vc_ptr + g * stride_vh
        if (lo <= pos) & (pos < hi):  # the chunk holding the new token writes it into the cache
            tl.store(kc + pos * stride_kn + rd[None, :], k_new.to(kc_ptr.dtype.element_ty))
            tl.store(vc + pos * stride_vn + rd[None, :], v_new.to(vc_ptr.dtype.element_ty))
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            n_ok = rn < hi
            old = n_ok & (rn != pos)
            is_new = (rn == pos)[:, None]
            kb = tl.load(kc + rn[:, None] * stride_kn + rd[None, :], mask=old[:, None], other=0.0)
            vb = tl.load(vc + rn[:, None] * stride_vn + rd[None, :], mask=old[:, None], other=0.0)
            kb = tl.where(is_new, k_new.to(kb.dtype), kb)  # [BLOCK_N, D]
            vb = tl.where(is_new, v_new.to(vb.dtype), vb)
            scores = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N], log2
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every tile has a slot <= pos
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new
        heads = g * GROUP + rg
        out_ok = g_ok[:, None]
        if active == 1:
            tl.store(out_ptr + heads[:, None] * D + rd[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                     mask=out_ok)
        else:
            # partials [kv heads, SPLITS, BLOCK_G, D + 2]: the values' sum, then the running max and sum
            row = part_ptr + ((g * SPLITS + split) * BLOCK_G + rg) * (D + 2)
            tl.store(row[:, None] + rd[None, :], acc, cache_modifier=".cg")
            tl.store(row + D, m_i, cache_modifier=".cg")
            tl.store(row + D + 1, l_i, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's partial is stored before the counter says so
            arrived = tl.atomic_add(sem_ptr + g, 1, sem="acq_rel", scope="gpu")
            if arrived == active - 1:  # the kv head's last program: every split is in
                m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for k in range(0, active):
                    m_all = tl.maximum(m_all, tl.load(part_ptr + ((g * SPLITS + k) * BLOCK_G + rg) * (D + 2) + D,
                                                      cache_modifier=".cg"))
                total = tl.zeros([BLOCK_G, D], tl.float32)
                norm = tl.zeros([BLOCK_G], tl.float32)
                for k in range(0, active):  # fixed order: the same sum whichever program is last
                    base = part_ptr + ((g * SPLITS + k) * BLOCK_G + rg) * (D + 2)
                    w = tl.exp2(tl.load(base + D, cache_modifier=".cg") - m_all)
                    norm += w * tl.load(base + D + 1, cache_modifier=".cg")
                    total += w[:, None] * tl.load(base[:, None] + rd[None, :], cache_modifier=".cg")
                tl.store(out_ptr + heads[:, None] * D + rd[None, :],
                         (total / norm[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
                tl.atomic_xchg(sem_ptr + g, 0)  # ready for the next launch


def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))  # the MMA's smallest M


def default_splits(plan) -> int:
    """About one program per SM over the kv heads, but no split shorter than one tile of the full cache."""
    index = plan.device.index if plan.device.index is not None else torch.cuda.current_device()
    return max(1, min(triton.cdiv(_sm_count(index), plan.n_kv), triton.cdiv(plan.max_len, BLOCK_N)))


def programmatic_launch(plan) -> bool:
    """Launch with programmatic dependent launch (Hopper or newer, unless ``HOLDALL_PDL=0``)."""
    from .gluon_wq4 import pdl_enabled  # the one switch for every decode kernel

    index = plan.device.index if plan.device.index is not None else torch.cuda.current_device()
    return pdl_enabled() and torch.cuda.get_device_capability(index) >= (9, 0)


def workspace(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 split partials and the zeroed per-kv-head counters (the kernel puts them back to zero)."""
    block_g = _block_g(plan.n_heads // plan.n_kv)
    partials = torch.empty(plan.n_kv * plan.splits * block_g * (plan.head_dim + 2), dtype=torch.float32,
                           device=plan.device)
    return partials, torch.zeros(plan.n_kv, dtype=torch.int32, device=plan.device)


def decode_attention(plan, q, k, v, k_cache, v_cache, position, cos, sin, scale: float) -> torch.Tensor:
    """Launch the kernel for one layer (shapes: :mod:`holdall.kernels.decode_attention`)."""
    n_kv, max_len, d = k_cache.shape
    if (n_kv, max_len, d) != (plan.n_kv, plan.max_len, plan.head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} is not this plan's "
                         f"[{plan.n_kv}, {plan.max_len}, {plan.head_dim}]")
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("the cache's head dimension must be contiguous")
    q, k, v = (t.reshape(-1).contiguous() for t in (q, k, v))
    if q.numel() != plan.n_heads * d or k.numel() != n_kv * d or v.numel() != n_kv * d:
        raise ValueError(f"q/k/v have {q.numel()}/{k.numel()}/{v.numel()} values; this plan wants "
                         f"{plan.n_heads * d}/{n_kv * d}/{n_kv * d}")
    if cos.shape[-2:] != (max_len, d) or sin.shape[-2:] != (max_len, d):
        raise ValueError(f"the rotary tables must be [{max_len}, {d}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    out = torch.empty(plan.n_heads * d, dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(n_kv, plan.splits)](
        q, k, v, k_cache, v_cache, position, cos.reshape(max_len, d), sin.reshape(max_len, d), out,
        plan._partials, plan._counters,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), scale * _LOG2E,
        GROUP=plan.n_heads // n_kv, BLOCK_G=_block_g(plan.n_heads // n_kv), D=d, SPLITS=plan.splits,
        BLOCK_N=BLOCK_N, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=plan.pdl, num_warps=4,
        launch_pdl=plan.pdl,
    )
    return out
