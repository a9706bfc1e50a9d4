"""AdamW with 8-bit block-wise states, and paged (CPU-resident) optimizer states.

8-bit states (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", as bitsandbytes does it):

* ``exp_avg`` (signed) is stored as uint8 codes of the signed 8-bit dynamic map and ``exp_avg_sq``
  (never negative) as codes of the unsigned dynamic map, each with one float32 absmax per block of 256;
  that is 1 + 4/256 bytes per state element instead of 4;
* every step dequantizes both states to float32, runs the ordinary AdamW update, and quantizes them back;
* parameters with fewer than ``min_8bit_size`` (4096) elements keep float32 states: quantization noise is
  worst on small tensors (biases, norms) and they cost nothing.

Paged states (``paged=True``): states live in CPU memory (pinned when CUDA is available, so copies are
asynchronous) while the parameters live on an accelerator. ``step`` moves one parameter's states to the
device, updates, and copies them back, so the device holds at most one parameter's states at a time.
On a CPU-only machine a paged optimizer is simply the unpaged one (the states are already in CPU memory).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..core.codebook import dequantize_dynamic, nearest_code, quantize_dynamic
from ..core.codebooks import dynamic_map
from ..errors import ConfigError

STATE_BLOCK = 256
MIN_8BIT_SIZE = 4096
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "fused_adamw8bit", "paged_fused_adamw8bit")


# --- block-wise 8-bit codes ------------------------------------------------------------------------------
def quantize_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape) -> ``(codes uint8 [numel], absmax float32 [ceil(numel/256)])``, signed dynamic map."""
    return quantize_dynamic(x, STATE_BLOCK)


def dequantize_signed(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float32 ``[numel]`` from :func:`quantize_signed`'s output."""
    return dequantize_dynamic(codes, absmax, STATE_BLOCK)


def quantize_unsigned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative ``x`` -> ``(codes uint8 [numel], absmax float32 [nb])`` with the unsigned dynamic map.

    The unsigned map spends the sign bit on precision (twice the codes per decade), which is what a
    second moment needs. Nearest code, ties to the smaller one; an all-zero block stores absmax 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // STATE_BLOCK)
    padded = torch.cat([flat, flat.new_zeros(nb * STATE_BLOCK - n)]).view(nb, STATE_BLOCK)  # [nb, 256]
    absmax = padded.amax(dim=-1)  # [nb]; values are >= 0
    normed = padded / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # [nb, 256] in [0, 1]
    codes = nearest_code(normed.reshape(-1), dynamic_map(signed=False, device=flat.device))
    return codes[:n], absmax


def dequantize_unsigned(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float32 ``[numel]`` from :func:`quantize_unsigned`'s output."""
    table = dynamic_map(signed=False, device=codes.device)
    values = table[codes.long()]  # [n]
    return values * absmax.repeat_interleave(STATE_BLOCK)[: codes.numel()]


# --- the optimizer ---------------------------------------------------------------------------------------
class AdamW8bit(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with block-wise 8-bit (or, ``optim_bits=32``, float32) states.

    paged: keep the states in CPU memory while the parameters are on an accelerator (see the module doc).
    min_8bit_size: parameters with fewer elements keep float32 states.
    The update is AdamW's (decoupled weight decay, bias correction), computed in float32 for every dtype.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        optim_bits: int = 8,
        paged: bool = False,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        if not lr >= 0:
            raise ConfigError(f"learning rate must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ConfigError(f"betas must be in [0, 1), got {betas}")
        if optim_bits not in (8, 32):
            raise ConfigError(f"optim_bits must be 8 or 32, got {optim_bits}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.paged = paged
        self.min_8bit_size = min_8bit_size

    # -- state layout --
    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _state_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.paged else p.device

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self._state_device(p)
        n = p.numel()
        if self._uses_8bit(p):
            nb = -(-n // STATE_BLOCK)
            state = {
                "exp_avg_codes": torch.zeros(n, dtype=torch.uint8, device=device),
                "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
                "exp_avg_sq_codes": torch.zeros(n, dtype=torch.uint8, device=device),
                "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
            }
        else:
            state = {
                "exp_avg": torch.zeros(n, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=device),
            }
        if self.paged and device.type == "cpu" and torch.cuda.is_available():
            state = {k: v.pin_memory() for k, v in state.items()}
        state["step"] = torch.zeros((), dtype=torch.float32)  # a CPU scalar, as torch.optim keeps it
        return state

    def _load_moments(self, state: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(exp_avg [n], exp_avg_sq [n])`` on ``device``."""
        if "exp_avg_codes" in state:
            m = dequantize_signed(
                state["exp_avg_codes"].to(device, non_blocking=True), state["exp_avg_absmax"].to(device)
            )
            v = dequantize_unsigned(
                state["exp_avg_sq_codes"].to(device, non_blocking=True), state["exp_avg_sq_absmax"].to(device)
            )
            return m, v
        # float32 states: on the parameter's device these are the stored tensors themselves (updated in place)
        return state["exp_avg"].to(device, non_blocking=True), state["exp_avg_sq"].to(device, non_blocking=True)

    def _store_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if "exp_avg_codes" in state:
            for key, (codes, absmax) in (("exp_avg", quantize_signed(m)), ("exp_avg_sq", quantize_unsigned(v))):
                state[f"{key}_codes"].copy_(codes, non_blocking=True)
                state[f"{key}_absmax"].copy_(absmax, non_blocking=True)
            return
        for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
            if state[key].data_ptr() != value.data_ptr():  # paged: copy back to CPU
                state[key].copy_(value, non_blocking=True)

    # -- the update --
    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        if self.paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # non-blocking copies back to pinned memory must land before the next step
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise ConfigError("AdamW8bit does not support sparse gradients; use torch.optim.SparseAdam")
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        state["step"] = state["step"] + 1  # a new tensor: a loaded state dict may share the old one
        grad = p.grad.reshape(-1).float()  # [n]
        m, v = self._load_moments(state, p.device)  # float32 [n] each
        p32 = p.detach().reshape(-1).float()  # a view when p is float32 and contiguous, else a copy
        _adamw(p32, grad, m, v, group, float(state["step"]))
        if p32.data_ptr() != p.data_ptr():
            p.copy_(p32.view_as(p))
        self._store_moments(state, m, v)

    # -- checkpoints --
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts every non-step state tensor to its parameter's dtype (uint8 codes would become
        # floats, float32 absmax would be rounded to bf16 next to a bf16 parameter). Put the stored tensors
        # back as they were saved; paged states go to (pinned) CPU memory, others next to their parameter.
        saved = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                for key, value in saved.get(index, {}).items():
                    if key == "step" or not torch.is_tensor(value):
                        continue
                    value = value.to(self._state_device(p), copy=True)
                    if self.paged and torch.cuda.is_available():
                        value = value.pin_memory()
                    self.state[p][key] = value

    def state_bytes(self) -> int:
        """Bytes held by the moment states (codes, absmax, float32 moments; the step counters excluded)."""
        return state_bytes(self)


def _run_closure(closure):
    """torch.optim's closure convention: re-evaluate the loss with gradients enabled (None without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _adamw(p32: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, group: dict, step: float) -> None:
    """One AdamW update in place on float32 ``p32``, ``m``, ``v`` (``[n]`` each): torch.optim.AdamW's arithmetic."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    p32.mul_(1 - lr * wd)  # decoupled weight decay, as torch.optim.AdamW
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
    p32.addcdiv_(m, denom, value=-lr / bias1)


class FusedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` over flat buckets of parameters: a handful of kernels per step instead of ~15 per tensor.

    Parameters of one group, device and state kind are concatenated into buckets of at most ``bucket_size``
    elements; each bucket's moments are one flat state (8-bit blocks of 256 over the concatenation, or float32
    for parameters under ``min_8bit_size``). A step per bucket: gather the gradients and values (one ``cat``
    each), one AdamW update, scatter the values back (one ``_foreach_copy_``). When every parameter's size is a
    multiple of 256 (LoRA's ``[r, in]``/``[out, r]`` with the usual widths) the 8-bit blocks are exactly the
    per-tensor ones, so the result equals :class:`AdamW8bit`'s; otherwise blocks straddle neighbouring tensors
    (same code map, same arithmetic). A parameter without a gradient in a step is treated as a zero gradient for
    its bucket's moments and is not written. ``paged=True`` keeps the states in pinned CPU memory, as
    bitsandbytes' paged optimizers do: each bucket's codes go to the device for its update and come back, so
    the device holds one bucket's states (~2 bytes per element of ``bucket_size``) instead of all of them during
    the forward and backward, for a host round trip of 2 bytes per parameter per step.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, optim_bits: int = 8, min_8bit_size: int = MIN_8BIT_SIZE, bucket_size: int = 1 << 22,
                 paged: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
                         paged=paged)
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise ConfigError(f"bucket_size must be a positive integer, got {bucket_size!r}")
        self.bucket_size = bucket_size
        self._buckets: list[tuple[dict, list[torch.Tensor]]] | None = None

    def _make_buckets(self) -> list[tuple[dict, list[torch.Tensor]]]:
        buckets = []
        for group in self.param_groups:
            kinds: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                kinds.setdefault((p.device, self._uses_8bit(p)), []).append(p)
            for members in kinds.values():
                current, size = [], 0
                for p in members:
                    if current and size + p.numel() > self.bucket_size:
                        buckets.append((group, current))
                        current, size = [], 0
                    current.append(p)
                    size += p.numel()
                buckets.append((group, current))
        return buckets

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        if self._buckets is None:
            self._buckets = self._make_buckets()
        for group, members in self._buckets:
            with_grad = [p for p in members if p.grad is not None]
            if not with_grad:
                continue
            if any(p.grad.is_sparse for p in with_grad):
                raise ConfigError("FusedAdamW8bit does not support sparse gradients; use torch.optim.SparseAdam")
            state = self.state[members[0]]  # a bucket's state lives under its first parameter
            if not state:
                state.update(self._init_bucket(members))
            state["step"] = state["step"] + 1  # a new tensor: a loaded state dict may share the old one
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in members])
            p32 = torch.cat([p.detach().reshape(-1).float() for p in members])
            if p32.is_cuda and "exp_avg_codes" in state:
                p32 = self._fused_8bit(state, grad, p32, group)
            else:
                m, v = self._load_moments(state, p32.device)
                _adamw(p32, grad, m, v, group, float(state["step"]))
                self._store_moments(state, m, v)
            pieces = p32.split([p.numel() for p in members])
            torch._foreach_copy_(with_grad, [piece.view_as(p) for p, piece in zip(members, pieces)
                                             if p.grad is not None])
        if self.paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # the states' copies back to pinned memory are complete when step returns
        return loss

    def _fused_8bit(self, state: dict, grad: torch.Tensor, p32: torch.Tensor, group: dict) -> torch.Tensor:
        """CUDA: dequantize, update and requantize a bucket in a few compiled kernels (eager: ~40 launches).

        The step-dependent scalars (lr, bias corrections) are device tensors, so a learning-rate schedule
        does not recompile; the arithmetic is :func:`_adamw`'s, with float32 scalars.
        """
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        hyper = torch.tensor([group["lr"], 1 - beta1**step, math.sqrt(1 - beta2**step)], dtype=torch.float32)
        keys = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
        moments = [state[key].to(p32.device, non_blocking=True) for key in keys]  # paged: to the device now
        p32, *updated = _compiled_8bit_step()(
            *moments, grad, p32, hyper.to(p32.device, non_blocking=True), beta1, beta2, group["eps"],
            group["weight_decay"])
        for key, value in zip(keys, updated):
            state[key].copy_(value, non_blocking=True)  # paged: back to pinned CPU memory
        return p32

    def _init_bucket(self, members: list[torch.Tensor]) -> dict:
        total = sum(p.numel() for p in members)
        flat = torch.empty(total, dtype=torch.float32, device=members[0].device)
        return self._init_state(flat) if self._uses_8bit(members[0]) else self._init_state_fp32(flat)

    def _init_state_fp32(self, flat: torch.Tensor) -> dict:
        n, device = flat.numel(), self._state_device(flat)
        pin = self.paged and device.type == "cpu" and torch.cuda.is_available()
        return {"exp_avg": torch.zeros(n, dtype=torch.float32, device=device, pin_memory=pin),
                "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=device, pin_memory=pin),
                "step": torch.zeros((), dtype=torch.float32)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._buckets = None  # rebuilt from the (same) parameter order on the next step


def _adamw_8bit_step(m_codes, m_absmax, v_codes, v_absmax, grad, p32, hyper, beta1, beta2, eps, wd):
    """One bucket's 8-bit AdamW step as one pure function (``torch.compile``'d on CUDA): returns the new float32
    values and the new codes/absmax of both moments. ``hyper`` = ``[lr, 1 - beta1^t, sqrt(1 - beta2^t)]``."""
    m = dequantize_signed(m_codes, m_absmax)
    v = dequantize_unsigned(v_codes, v_absmax)
    m = m * beta1 + grad * (1 - beta1)
    v = v * beta2 + grad * grad * (1 - beta2)
    lr = hyper[0]
    p32 = p32 * (1 - lr * wd)
    p32 = p32 - (lr / hyper[1]) * (m / (v.sqrt() / hyper[2] + eps))
    mc, ma = quantize_signed(m)
    vc, va = quantize_unsigned(v)
    return p32, mc, ma, vc, va


_COMPILED_STEP: list = []


def _compiled_8bit_step():
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(_adamw_8bit_step, dynamic=None))
    return _COMPILED_STEP[0]


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its 8-bit states in CPU memory (``paged=True``)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 **kw):
        super().__init__(params, lr, betas, eps, weight_decay, paged=True, **kw)


class PagedAdamW(AdamW8bit):
    """AdamW with float32 states in CPU memory (``optim_bits=32, paged=True``)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 **kw):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=32, paged=True, **kw)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensor states of any torch optimizer, the per-parameter ``step`` counters excluded."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)
) -> torch.optim.Optimizer:
    """``"adamw"`` (torch) | ``"adamw8bit"`` | ``"paged_adamw8bit"`` | ``"paged_adamw"`` | ``"fused_adamw8bit"`` |
    ``"paged_fused_adamw8bit"`` (the fused buckets with their states in pinned CPU memory)."""
    params = list(params)
    if not params:
        raise ConfigError("no trainable parameters: add an adapter (add_lora) or unfreeze something before training")
    if name == "adamw":
        # foreach=False: the multi-tensor path reorders float operations between versions; the plain loop keeps
        # a resumed run bit-identical to an uninterrupted one on the same machine
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "paged_adamw8bit":
        return PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name in ("fused_adamw8bit", "paged_fused_adamw8bit"):
        return FusedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, paged=name.startswith("paged"))
    if name == "paged_adamw":
        return PagedAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
