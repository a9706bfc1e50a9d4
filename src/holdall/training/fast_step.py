"""A fused LoRA / QLoRA training step for Llama-shaped models: what the Hugging Face stack leaves separate, done in
one place.

``FastStep(model)(input_ids, labels)`` computes the same loss and the same adapter gradients as
``model(input_ids, labels=labels).loss.backward()`` on a model prepared by ``training.prepare_model`` (holdall's
``LoraLinear`` over a float or 4-bit ``QuantLinear`` base), with gradient checkpointing per decoder layer. The
model's own modules hold every weight; this class only orders the arithmetic differently:

* **Grouped projections.** q/k/v read the same normed input, and so do gate/up: a group is one autograd node
  with one output per member (never concatenated: the outputs and their gradients are not copied). The base
  weights are dequantized one at a time (``kernels.dequant``: a Triton kernel on CUDA, 2 bytes written per
  weight) and freed after their GEMM, so only one layer's float weight is ever alive. The group's LoRA-A
  products are one ``[T, 3r]`` GEMM; each member's LoRA-B product is added into its output with the scaling
  folded into B.
* **A hand-written backward** for each group (``_GroupLinear``): it keeps the group's input and its ``[T, r]``
  LoRA-A products, never the dequantized weight (dequantized again for the input gradient), and returns the
  adapter gradients from a handful of skinny GEMMs. LoRA dropout is regenerated from a per-call seed in
  backward instead of storing masks.
* **Checkpointing by construction.** The forward runs with no autograd graph at all and keeps only each layer's
  input (``[B, S, hidden]``); backward recomputes one layer at a time with autograd and frees it. Checkpoints can
  live in pinned CPU memory (``offload``): copied out on a side stream during the forward, prefetched one layer
  ahead during the backward.
* **Token-chunked MLP.** The MLP (and its norm) is token-wise, so it runs in chunks of ``mlp_chunk`` tokens in
  both passes: its ``[T, intermediate]`` activations never exist for the whole sequence at once, which is what
  bounds the longest trainable sequence once checkpoints are offloaded.
* **Chunked cross-entropy.** Logits exist only ``loss_chunk`` tokens at a time (``[chunk, vocab]`` in float32);
  the loss and its gradient w.r.t. the final hidden states come out of the same pass, so the full ``[T, vocab]``
  float32 logits (1 GiB at 8k tokens of a 32k vocabulary) never exist.
* **Fused pointwise ops.** RMSNorm, rotary and SiLU x up are ``models.llama_ops``' functions, compiled with
  ``torch.compile`` on CUDA (forward and backward each one kernel); attention is PyTorch's SDPA (flash).
* **CUDA graphs** (``cuda_graphs``): each layer's forward and backward captured once per batch shape and replayed,
  so a step costs ~2 launches per layer instead of ~500 (the eager step is CPU-bound on a 7B model at 2k tokens).

Everything runs in the model's dtype (bf16 for a bf16 base; autocast is not used). LoRA dropout applies while the
model is in training mode, as in ``LoraLinear``.

Supported: the Llama-shaped families (llama, mistral, qwen2), LoRA adapters (one active adapter) on any of the
seven decoder linears, every other parameter frozen, no padding inside a sequence (``labels = -100`` marks
positions that are not scored, e.g. right padding or a prompt). Anything else raises an error that says to use
the standard trainer path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..kernels import available as kernels_available
from ..kernels.dequant import decodes_rows, weight_rows
from ..models import llama_ops
from ..models.families import get_family
from ..tuners.lora import LoraLinear

SUPPORTED = ("llama", "mistral", "qwen2")
IGNORE_INDEX = -100
OFFLOAD_MODES = ("none", "cpu", "auto")
MAX_GRAPHED_SHAPES = 2
LAYER_SEEDS = 1 << 20  # dropout seeds per layer: q/k/v, o, then 32 per MLP chunk
MASK_STORE_BYTES = 512 << 20  # plain-torch path: the forward's dropout masks kept for the recompute up to this


@dataclass(frozen=True)
class FastStepConfig:
    """How :class:`FastStep` trades memory for speed.

    loss_chunk: tokens per lm_head / cross-entropy chunk (float32 logits of ``loss_chunk x vocab`` at a time).
    mlp_chunk: tokens per MLP chunk; None = the whole sequence up to 8192 tokens, then chunks of 8192.
    offload: where layer checkpoints live: ``"none"`` on the device, ``"cpu"`` all in pinned CPU memory,
        ``"auto"`` on the device while they fit beside the step's working set, the rest in CPU memory.
    compile: ``torch.compile`` the pointwise ops (default: on CUDA).
    cuda_graphs: replay each layer's forward and backward as CUDA graphs (one capture per batch shape, the last
        ``MAX_GRAPHED_SHAPES`` kept; checkpoints offloaded as ``offload`` says, through two device buffers).
        Removes the per-op launch cost that bounds a 7B step at short sequences; adapters' ``.grad`` become views
        of one flat buffer.
    memory_budget_gib: ``"auto"`` plans checkpoints for this much device memory (default: the device's free memory);
        for running as if on a smaller card, together with ``torch.cuda.set_per_process_memory_fraction``.
    """

    loss_chunk: int = 512
    mlp_chunk: int | None = None
    offload: str = "auto"
    compile: bool | None = None
    memory_budget_gib: float | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        for name in ("loss_chunk", "mlp_chunk"):
            value = getattr(self, name)
            if value is None and name == "mlp_chunk":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.memory_budget_gib is not None and not self.memory_budget_gib > 0:
            raise ConfigError(f"memory_budget_gib must be a positive number of GiB, got {self.memory_budget_gib!r}")


# --- one group of projections that read the same input --------------------------------------------------------
@dataclass
class _Member:
    base: nn.Module  # QuantLinear or nn.Linear (frozen)
    lora_A: nn.Parameter | None  # [r, in]
    lora_B: nn.Parameter | None  # [out, r]
    scaling: float
    dropout: float


class _Group:
    """Projections sharing one input: their base layers and their adapters (in output order)."""

    caching = True  # off while CUDA graphs are captured (the casts must be part of the graphs)

    def __init__(self, modules: Sequence[nn.Module]):
        self.members = [_member(m) for m in modules]
        self.bases = [m.base for m in self.members]
        self.biases = [m.base.bias for m in self.members]
        self.adapted = [j for j, m in enumerate(self.members) if m.lora_A is not None]
        self.ranks = [self.members[j].lora_A.shape[0] for j in self.adapted]
        self.rank_slices = [slice(st, st + r) for st, r in zip(_starts(self.ranks), self.ranks)]  # columns of xa
        self.no_dropout = all(self.members[j].dropout == 0 for j in self.adapted)
        self._mats_key: tuple | None = None
        self._mats: tuple | None = None

    def lora_mats(self, lora: Sequence[torch.Tensor], dtype: torch.dtype):
        """``(A_cat [R, in], [A_k [r_k, in]], [scaling_k · B_k [out_k, r_k]])`` in ``dtype`` for the adapted
        members, computed once per parameter update.

        Keyed by the adapters' version counters (the optimizer's in-place update bumps them), so the forward,
        the recompute and the backward of one step share one cast; ``clear()`` drops it after a layer is done.
        """
        key = (dtype, tuple(t._version for t in lora), tuple(t.data_ptr() for t in lora))
        if not _Group.caching:
            self._mats_key = None
            return self._compute_mats(lora, dtype)
        if key != self._mats_key:
            self._mats = self._compute_mats(lora, dtype)
            self._mats_key = key
        return self._mats

    def _compute_mats(self, lora: Sequence[torch.Tensor], dtype: torch.dtype):
        a_cat = torch.cat([a.detach().to(dtype) for a in lora[0::2]])
        a_views = [a_cat[cols] for cols in self.rank_slices]
        b_scaled = [b.detach().to(dtype) * self.members[j].scaling for b, j in zip(lora[1::2], self.adapted)]
        return a_cat, a_views, b_scaled

    def clear(self) -> None:
        self._mats_key = self._mats = None

    def params(self) -> list[nn.Parameter]:
        """The adapters' parameters in the order ``_GroupLinear`` takes them: A_0, B_0, A_1, B_1, ..."""
        return [p for j in self.adapted for p in (self.members[j].lora_A, self.members[j].lora_B)]


def _starts(sizes: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    return starts


def _member(module: nn.Module) -> _Member:
    if isinstance(module, LoraLinear):
        if module.row_groups is not None or module.merged_adapters or module.adapters_disabled:
            raise ConfigError("the fast step trains one active, unmerged adapter; undo adapter_rows / merge first")
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) > 1:
            raise ConfigError(
                f"the fast step trains one active adapter per layer, this layer has {len(active)} ({active}); "
                "set_adapter() to the one you train"
            )
        if not active:
            return _Member(module.base_layer, None, None, 0.0, 0.0)
        name = active[0]
        return _Member(module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight,
                       float(module.scaling[name]), float(module.dropout[name]))
    if isinstance(module, nn.Linear) or hasattr(module, "scheme"):
        return _Member(module, None, None, 0.0, 0.0)
    raise UnsupportedModelError(f"the fast step expects linear projections, found {type(module).__name__}")


@dataclass(frozen=True)
class _Seed:
    """Where a dropout mask comes from: the step's base seed plus a fixed per-call offset.

    ``device`` (CUDA with Triton): a one-element int64 device tensor holding the step's base, read by the dropout
    kernel, so CUDA graphs replay with each step's new seed. Otherwise ``base`` (a Python int) seeds a generator.
    """

    base: int
    device: torch.Tensor | None = None
    offset: int = 0
    train: bool = True  # False (the model in eval mode): LoRA dropout is off, as in LoraLinear.forward
    # plain-torch path, when the step's masks fit its budget: the forward's masks by offset, taken by the recompute
    store: dict | None = None

    def __add__(self, n: int) -> "_Seed":
        return _Seed(self.base, self.device, self.offset + n, self.train, self.store)


_GENERATORS: dict[str, torch.Generator] = {}


def _dropout_mask(like: torch.Tensor, p: float, seed: _Seed) -> torch.Tensor:
    """The plain-torch keep-mask (bool, ``like``'s shape) of ``seed``: the same in forward, recompute and backward.

    ``rand >= p`` rather than ``bernoulli_``: on CPU it is ~1.7x faster, and mask generation is most of what LoRA
    dropout costs there.
    """
    key = str(like.device)
    gen = _GENERATORS.get(key)
    if gen is None:
        gen = _GENERATORS[key] = torch.Generator(device=like.device)
    gen.manual_seed(seed.base + seed.offset)
    return torch.rand(like.shape, generator=gen, device=like.device) >= p


def _stored_mask(like: torch.Tensor, p: float, seed: _Seed, take: bool) -> torch.Tensor:
    """The keep-mask of ``seed``, drawn once per step when the step keeps a store: the no-grad forward puts it
    there, the recompute takes it out (and hands it to its backward); without a store it is drawn each time."""
    if seed.store is None:
        return _dropout_mask(like, p, seed)
    mask = seed.store.pop(seed.offset, None) if take else None
    if mask is None:
        mask = _dropout_mask(like, p, seed)
        if not take:
            seed.store[seed.offset] = mask
    return mask


def _uses_kernel(x: torch.Tensor, seed: _Seed) -> bool:
    return seed.device is not None and x.is_cuda and x.is_contiguous()


def _dropout(x: torch.Tensor, p: float, seed: _Seed, add: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """``dropout(x) (+ add)`` with the mask of ``seed`` (``x`` itself when ``p == 0`` or in eval mode; in place
    on ``x`` only with ``inplace``: a temporary the caller gives up). ``add`` is accumulated into in place and
    returned (no third ``[N, in]`` tensor in backward); without ``add``, ``inplace`` writes the result over ``x``
    (the first adapter's input gradient: no second ``[N, in]`` tensor beside its product).
    ``mask``: the keep-mask when the caller already has it (the recompute keeps its masks for the backward that
    follows, so the plain-torch path draws each mask twice per step, not three times)."""
    if p == 0 or not seed.train:
        return x if add is None else add.add_(x)
    if mask is None and _uses_kernel(x, seed) and (add is None or add.is_contiguous()):
        from ..kernels import triton_dropout

        out = add if add is not None else (x if inplace else None)
        return triton_dropout.dropout(x, p, seed.device, seed.offset, add=add, out=out)
    keep = _dropout_mask(x, p, seed) if mask is None else mask
    if inplace and add is None:
        return x.mul_(keep).mul_(1.0 / (1.0 - p))
    dropped = (x * keep).mul_(1.0 / (1.0 - p))
    return dropped if add is None else add.add_(dropped)


class _GroupLinear(torch.autograd.Function):
    """``y_j = x @ W_j^T (+ b_j) + s_j · dropout_j(x) @ A_j^T @ B_j^T`` for each member ``j`` of a group.

    x ``[N, in]`` (the compute dtype); returns one ``[N, out_j]`` tensor per member. There is no concatenated
    output: the callers split q/k/v and gate/up anyway, and a concatenation would cost a copy of the outputs
    here and of their gradients in backward. Saves x, the ``[N, sum(r)]`` LoRA-A products and the adapters; the
    base weights are dequantized again in backward, one at a time, only if the input gradient is wanted.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: _Group, seed: _Seed, keep_masks: bool, *lora: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        ys = _base_forward(group, x)  # [N, out_j] each
        xa = None
        if group.adapted:
            a_cat, a_views, b_scaled = group.lora_mats(lora, dtype)  # [R, in], [r_k, in] each, [out_j, r_k] each
            if group.no_dropout or not seed.train:
                xa = x @ a_cat.t()  # [N, R]
            else:
                ps = [group.members[j].dropout for j in group.adapted]
                masks = [None] * len(ps)
                if not _uses_kernel(x, seed) and (keep_masks or seed.store is not None):
                    masks = [_stored_mask(x, p, seed + j, take=keep_masks) if p else None
                             for j, p in zip(group.adapted, ps)]
                    if keep_masks:  # this forward's backward follows: it uses the same masks
                        ctx.masks = masks
                xa = torch.cat([_dropout(x, p, seed + j, mask=m) @ a.t()
                                for j, p, m, a in zip(group.adapted, ps, masks, a_views)], dim=1)
            for k, j in enumerate(group.adapted):
                ys[j].addmm_(xa[:, group.rank_slices[k]], b_scaled[k].t())
        ctx.group, ctx.seed = group, seed
        ctx.save_for_backward(x, xa, *lora)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, xa, *lora = ctx.saved_tensors
        group: _Group = ctx.group
        dtype = dys[0].dtype
        grads: list[torch.Tensor | None] = []
        dx = None  # [N, in]: the LoRA paths' part first, then the base weights' (added block by block)
        if group.adapted:
            a_list, b_list = lora[0::2], lora[1::2]
            a_cat, a16, b_scaled = group.lora_mats(lora, dtype)
            dxa = torch.cat([dys[j] @ b for j, b in zip(group.adapted, b_scaled)], dim=1)  # [N, R], scaling in
            no_dropout = group.no_dropout or not ctx.seed.train
            if no_dropout:
                da_all = dxa.t() @ x  # [R, in]
                if ctx.needs_input_grad[0]:
                    dx = dxa @ a_cat
            for k, (j, a, b) in enumerate(zip(group.adapted, a_list, b_list)):
                cols = group.rank_slices[k]
                scaling = group.members[j].scaling
                db = (dys[j].t() @ xa[:, cols]).mul_(scaling)  # [out_j, r]
                if no_dropout:
                    da = da_all[cols]
                else:
                    p, seed = group.members[j].dropout, ctx.seed + j
                    mask = ctx.masks[k] if getattr(ctx, "masks", None) else None
                    da = dxa[:, cols].t() @ _dropout(x, p, seed, mask=mask)  # [r, in]
                    if ctx.needs_input_grad[0]:  # dx + dropout'(the LoRA path)
                        dx = _dropout(dxa[:, cols] @ a16[k], p, seed, add=dx, mask=mask, inplace=True)
                grads += [da.to(a.dtype), db.to(b.dtype)]
        if ctx.needs_input_grad[0]:
            dx = _base_input_grad(group, dys, dx)
        return (dx, None, None, None, *grads)


def _base_forward(group: _Group, x: torch.Tensor) -> list[torch.Tensor]:
    """``x @ W_j^T (+ b_j)`` ``[N, out_j]`` for each base of the group, one base weight dequantized at a time.

    Each member's ``[out_j, in]`` weight is decoded, multiplied and freed before the next is decoded: a 7B
    gate/up pair holds one 86 MiB bf16 weight at a time instead of a 172 MiB stacked one, at the same FLOPs.
    """
    ys = []
    for base, bias in zip(group.bases, group.biases):
        weight = weight_rows(base, x.dtype, x.device)  # [out_j, in]
        ys.append(F.linear(x, weight, None if bias is None else bias.to(x.dtype)))
        del weight
    return ys


_GRAD_BLOCK_BYTES = 32 << 20  # float weight rows decoded at once for the input gradient


def _row_blocks(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges of ``layer``'s weight holding at most ``_GRAD_BLOCK_BYTES`` of ``dtype`` (multiples of 128 rows)
    where the kernel decodes a block of rows on its own; one range otherwise (a float weight is used in place, and
    the plain-torch decoder would decode the whole weight once per block)."""
    n = layer.out_features
    if not decodes_rows(layer, device):
        return [(0, n)]
    size = max(128, (_GRAD_BLOCK_BYTES // (layer.in_features * dtype.itemsize)) // 128 * 128)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _base_input_grad(group: _Group, dys: Sequence[torch.Tensor], dx: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_j dy_j @ W_j`` ``[N, in]`` over the group's bases, a block of one weight's rows dequantized at a time:
    ``dy_j @ W_j = Σ_blocks dy_j[:, rows] @ W_j[rows]``, so a 7B down projection's gradient holds ~32 MiB of
    float weight instead of 86 MiB (one more read and write of ``dx`` per block). Added into ``dx`` when given."""
    for base, dy in zip(group.bases, dys):
        for start, stop in _row_blocks(base, dy.dtype, dy.device):
            weight = weight_rows(base, dy.dtype, dy.device, start, stop)  # [rows, in]
            part = dy[:, start:stop]
            dx = part @ weight if dx is None else dx.addmm_(part, weight)
            del weight
    return dx


def _apply(group: _Group, x: torch.Tensor, seed: _Seed) -> tuple[torch.Tensor, ...]:
    # with autograd on, this is the recompute whose backward comes next: it may keep its dropout masks
    return _GroupLinear.apply(x, group, seed, torch.is_grad_enabled(), *group.params())


# --- checkpoints, optionally in pinned CPU memory ----------------------------------------------------------------
class _Checkpoints:
    """Each decoder layer's input during one step: on the device, or copied to pinned CPU memory on a side stream.

    ``on_device`` layers (the last ones, which backward needs first) stay on the device; the others go to host
    buffers that are allocated once per shape and reused across steps. ``get(i)`` returns layer i's input on the
    device and starts copying layer ``i - 1`` in, so the copy overlaps layer i's backward.
    """

    def __init__(self, n_layers: int, on_device: int, host_cache: dict, stream: "torch.cuda.Stream | None"):
        self.n = n_layers
        self.first_on_device = n_layers - on_device
        self.saved: dict[int, torch.Tensor] = {}
        self.events: dict[int, torch.cuda.Event] = {}
        self.host_cache = host_cache
        self.stream = stream if self.first_on_device > 0 else None

    def put(self, i: int, x: torch.Tensor) -> None:
        if i >= self.first_on_device:
            self.saved[i] = x
            return
        key = (i, tuple(x.shape), x.dtype)
        host = self.host_cache.get(key)
        if host is None:
            host = self.host_cache[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.saved[i] = host

    def _fetch(self, i: int, device: torch.device) -> None:
        if i < 0 or i >= self.first_on_device or self.saved[i].is_cuda:
            return
        with torch.cuda.stream(self.stream):
            x = self.saved[i].to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.saved[i], self.events[i] = x, event

    def get(self, i: int, device: torch.device) -> torch.Tensor:
        if self.stream is None:  # everything stayed on the device
            return self.saved.pop(i)
        self._fetch(i, device)
        event = self.events.pop(i, None)
        x = self.saved.pop(i)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
            x.record_stream(torch.cuda.current_stream())
        self._fetch(i - 1, device)
        return x


# --- the step ------------------------------------------------------------------------------------------------------
class _Layer:
    def __init__(self, block: nn.Module):
        attn, mlp = block.self_attn, block.mlp
        self.qkv = _Group([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Group([attn.o_proj])
        self.gate_up = _Group([mlp.gate_proj, mlp.up_proj])
        self.down = _Group([mlp.down_proj])
        self.norm1, self.norm2 = block.input_layernorm, block.post_attention_layernorm
        self.intermediate = mlp.gate_proj.out_features if hasattr(mlp.gate_proj, "out_features") else None

    def groups(self) -> tuple[_Group, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.groups() for p in g.params()]

    def clear(self) -> None:
        for group in self.groups():
            group.clear()


class FastStep:
    """Loss and adapter gradients of one batch, computed the fused way (see the module docstring).

    model: a transformers Llama/Mistral/Qwen2 causal LM whose trainable parameters are exactly the LoRA adapters
        (``training.prepare_model`` with method ``"lora"`` or ``"qlora"``), on the device it trains on.
    ``step(input_ids, labels=None)`` accumulates the gradients into the adapters' ``.grad`` (like ``backward``)
    and returns the token-mean loss (a float32 scalar tensor, detached).
    """

    def __init__(self, model: nn.Module, config: FastStepConfig | None = None):
        self.config = config or FastStepConfig()
        family = get_family(model)
        if family.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"the fast step supports {', '.join(SUPPORTED)}; {family.model_type} is not Llama-shaped here. "
                "Train it with the standard path (finetune without fast_step)"
            )
        cfg = model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"the fast step fuses a SiLU-gated MLP; this model uses {cfg.hidden_act!r}")
        self.model = model
        self.core = model.model
        self.layers = [_Layer(block) for block in self.core.layers]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        window = getattr(cfg, "sliding_window", None)
        self.window = window if window is not None and getattr(cfg, "use_sliding_window", True) else None
        head = model.lm_head
        if isinstance(head, LoraLinear) or any(p.requires_grad for p in head.parameters()):
            raise ConfigError("the fast step keeps lm_head frozen; train it with the standard path")
        self.head = head
        self._check_trainable()
        weight = self.core.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        use_compile = self.device.type == "cuda" if self.config.compile is None else bool(self.config.compile)
        self.ops = _compiled_ops() if use_compile else _EAGER_OPS
        self._host_cache: dict = {}  # pinned checkpoint buffers by (layer, shape, dtype), reused across steps
        self._copy_stream: torch.cuda.Stream | None = None  # the checkpoints' copies, created once
        self.last_on_device: int | None = None  # checkpoints the last step kept on the device
        self._seed_dev: torch.Tensor | None = None
        self._grad_scale = 1.0
        self._graphs: dict[tuple, _GraphedLayers] = {}

    def _check_trainable(self) -> None:
        adapters = {id(p) for layer in self.layers for p in layer.params()}
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in adapters:
                raise ConfigError(
                    f"the fast step trains LoRA adapters only, but {name} requires a gradient (modules_to_save or an "
                    "unfrozen base?); train this model with the standard path"
                )
        if not adapters:
            raise ConfigError("no LoRA adapter on the decoder projections: nothing for the fast step to train")

    # -- the layer pieces --
    def _attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seed: _Seed) -> torch.Tensor:
        """``o_proj(attention(norm1(x)))`` ``[B, S, hidden]``."""
        layer = self.layers[i]
        b, s, _ = x.shape
        h = self.ops.rms_norm(x, layer.norm1.weight, layer.norm1.variance_epsilon).reshape(b * s, -1)
        q, k, v = _apply(layer.qkv, h, seed)  # [N, nh d], [N, nkv d], [N, nkv d]
        d, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        q = q.view(b, s, nh, d).transpose(1, 2)
        k = k.view(b, s, nkv, d).transpose(1, 2)
        v = v.view(b, s, nkv, d).transpose(1, 2)
        q, k = self.ops.rotate(q, k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)  # [B, nh, S, d]
        attn = attn.transpose(1, 2).reshape(b * s, nh * d)
        return _apply(layer.o, attn, seed + 8)[0].view(b, s, -1)

    def _mlp(self, i: int, x2: torch.Tensor, seed: _Seed) -> torch.Tensor:
        """``down(silu(gate(norm2(x2))) * up(norm2(x2)))`` for a chunk of tokens ``[n, hidden]``."""
        layer = self.layers[i]
        h = self.ops.rms_norm(x2, layer.norm2.weight, layer.norm2.variance_epsilon)
        gate, up = _apply(layer.gate_up, h, seed)  # [n, I] each
        return _apply(layer.down, self.ops.silu_mul(gate, up), seed + 4)[0]

    def _chunks(self, n: int) -> list[slice]:
        size = self.config.mlp_chunk or (n if n <= 8192 else 8192)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _layer_forward(self, i: int, x: torch.Tensor, cos, sin, seed: _Seed) -> torch.Tensor:
        x2 = x + self._attention(i, x, cos, sin, seed)
        flat = x2.view(-1, self.hidden)
        out = torch.empty_like(flat)
        for c, rows in enumerate(self._chunks(flat.shape[0])):
            out[rows] = flat[rows] + self._mlp(i, flat[rows], seed + 16 + 32 * c)
        return out.view_as(x)

    def _layer_backward(self, i: int, x: torch.Tensor, dout: torch.Tensor, cos, sin, seed: _Seed,
                        need_dx: bool) -> torch.Tensor | None:
        """Recompute layer i from its input with autograd and backpropagate ``dout``; returns d(loss)/dx."""
        xg = x.detach().requires_grad_(need_dx)
        with torch.enable_grad():  # x2 = x + attn(x); the attention's output itself is not kept
            x2 = xg + self._attention(i, xg, cos, sin, seed)
        flat = x2.detach().view(-1, self.hidden)
        dx2 = dout.reshape(-1, self.hidden)  # out = x2 + mlp(x2): d/dx2 = dout + mlp's input gradient
        for c, rows in enumerate(self._chunks(flat.shape[0])):
            x2c = flat[rows].detach().requires_grad_()
            with torch.enable_grad():
                y = self._mlp(i, x2c, seed + 16 + 32 * c)
            torch.autograd.backward(y, dout.reshape(-1, self.hidden)[rows])
            dx2[rows] += x2c.grad
            del y, x2c
        del flat
        if x2.requires_grad:  # False only when nothing in the attention is trained and x needs no gradient
            torch.autograd.backward(x2, dx2.view_as(x2))  # into the attention and, by the residual, into x
        if not need_dx:
            return None
        return xg.grad

    # -- the whole step --
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, grad_scale: float = 1.0) -> torch.Tensor:
        """Loss of the batch; its gradient (times ``grad_scale``, e.g. a micro-batch's share of the targets under
        gradient accumulation) is added to the adapters' ``.grad``.

        attention_mask: optional; only right padding is supported (each row ``1..1 0..0``), whose padded
        positions must carry label -100 (``training.data.collate`` does both).
        """
        ids = input_ids.to(self.device)
        if ids.dim() != 2:
            raise ConfigError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        labels = ids if labels is None else labels.to(self.device)
        if labels.shape != ids.shape:
            raise ConfigError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(ids.shape)}")
        if attention_mask is not None:
            _check_right_padded(attention_mask.to(self.device), labels)
        self._grad_scale = float(grad_scale)
        b, s = ids.shape
        if self.window is not None and s > self.window:
            raise ConfigError(
                f"the model attends over a sliding window of {self.window} tokens and the fast step attends over the "
                f"whole sequence; use sequences of at most {self.window} tokens or the standard path"
            )
        seed = self._seed(int(torch.randint(0, 2**40, (1,)).item()), b * s)  # torch's seed decides the masks
        if self._use_graphs(ids):
            return self._graphed_step(ids, labels, seed)
        positions = torch.arange(s, device=self.device)[None].expand(b, s)
        with torch.no_grad():
            x = F.embedding(ids, self.core.embed_tokens.weight)  # [B, S, hidden]
            cos, sin = self.core.rotary_emb(x, positions)
            saves = self._checkpoints(x)
            for i in range(len(self.layers)):
                saves.put(i, x)
                x = self._layer_forward(i, x, cos, sin, seed + LAYER_SEEDS * i)
                self.layers[i].clear()
        loss, dx = self._loss_and_grad(x, labels)
        del x
        for i in reversed(range(len(self.layers))):
            x_i = saves.get(i, self.device)
            dx = self._layer_backward(i, x_i, dx, cos, sin, seed + LAYER_SEEDS * i, need_dx=i > 0)
            self.layers[i].clear()
            del x_i
        return loss

    def _loss_and_grad(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of the last layer's output ``x`` and its gradient w.r.t. ``x`` (through the final norm)."""
        xl = x.detach().requires_grad_()
        with torch.enable_grad():
            norm = self.core.norm
            hn = self.ops.rms_norm(xl, norm.weight, norm.variance_epsilon)
        loss, dhn = lm_loss(hn.detach(), self._head_weight(), labels, self.config.loss_chunk)
        if self._grad_scale != 1.0:
            dhn.mul_(self._grad_scale)
        torch.autograd.backward(hn, dhn)
        return loss, xl.grad

    def _seed(self, value: int, tokens: int) -> _Seed:
        train = self.model.training
        if self.device.type == "cuda" and kernels_available():
            if self._seed_dev is None:
                self._seed_dev = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._seed_dev.fill_(value)
            return _Seed(value, self._seed_dev, train=train)
        # Plain-torch masks cost ~3 ns per element to draw on a CPU: keep the forward's for the recompute when
        # all of them (one byte per element) fit MASK_STORE_BYTES, so each is drawn once per step.
        store = {} if train and tokens * self._mask_elements_per_token() <= MASK_STORE_BYTES else None
        return _Seed(value, train=train, store=store)

    def _mask_elements_per_token(self) -> int:
        total = 0
        for layer in self.layers:
            for group in layer.groups():
                inputs = group.bases[0].in_features
                total += inputs * sum(1 for j in group.adapted if group.members[j].dropout > 0)
        return total

    # -- CUDA graphs --
    def _use_graphs(self, ids: torch.Tensor) -> bool:
        if not self.config.cuda_graphs or self.device.type != "cuda" or not kernels_available():
            return False
        return True

    def _graph_offload(self, ids: torch.Tensor) -> bool:
        """Graphs keep two checkpoint buffers on the device and the rest in pinned CPU memory ("cpu", or "auto"
        when the checkpoints do not all fit beside the working set)."""
        mode = self.config.offload
        return mode == "cpu" or (mode == "auto" and self._fitting_checkpoints_for(ids) < len(self.layers))

    def _fitting_checkpoints_for(self, ids: torch.Tensor) -> int:
        return self._fitting_checkpoints(torch.empty(*ids.shape, self.hidden, dtype=self.dtype, device="meta"))

    def _graphed_step(self, ids: torch.Tensor, labels: torch.Tensor, seed: _Seed) -> torch.Tensor:
        """The step as 2 x layers replayed CUDA graphs (one per layer forward, one per layer backward) around
        the eager loss: one launch per layer instead of hundreds. Graphs are captured per batch shape."""
        shape = (tuple(ids.shape), seed.train)  # eval mode (no dropout) captures its own graphs
        graphed = self._graphs.get(shape)
        if graphed is None:
            while len(self._graphs) >= MAX_GRAPHED_SHAPES:
                self._graphs.pop(next(iter(self._graphs)))
            graphed = self._graphs[shape] = _GraphedLayers(self, ids, seed, self._graph_offload(ids))
        with torch.no_grad():
            graphed.x[0].copy_(F.embedding(ids, self.core.embed_tokens.weight))
        graphed.replay_forward()
        loss, dx = self._loss_and_grad(graphed.x[-1], labels)
        graphed.dout[len(self.layers) % 2].copy_(dx)
        del dx
        graphed.attach_grads()
        graphed.replay_backward()
        return loss

    __call__ = step

    def _head_weight(self) -> torch.Tensor:
        head = self.head
        if hasattr(head, "scheme"):
            return weight_rows(head, self.dtype, self.device)
        return head.weight.to(self.dtype)

    def _checkpoints(self, x: torch.Tensor) -> "_Checkpoints":
        n = len(self.layers)
        mode = self.config.offload
        if self.device.type != "cuda" or mode == "none":
            on_device = n
        elif mode == "cpu":
            on_device = 0
        else:
            on_device = min(n, self._fitting_checkpoints(x))
        self.last_on_device = on_device
        if on_device < n and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return _Checkpoints(n, on_device, self._host_cache, self._copy_stream)

    def _fitting_checkpoints(self, x: torch.Tensor) -> int:
        """How many layer inputs fit on the device beside the step's working set (the rest go to CPU memory).

        The working set of one layer's backward measured ~15 hidden-sized ``[B, S, hidden]`` activations on a
        7B shape at 64k and 128k tokens (q/k/v and their gradients, the attention output, the layer's input,
        output and their gradients, the attention's float32 buffers); planned as 16 plus the MLP chunk's
        ``[chunk, intermediate]`` tensors and the loss chunk's logits, with 15% kept back for fragmentation.
        """
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if self.config.memory_budget_gib is not None:
            free = min(free, self.config.memory_budget_gib * 2**30 - torch.cuda.memory_allocated(self.device))
        unit = x.numel() * x.element_size()
        inter = max((layer.intermediate or 0) for layer in self.layers) or 4 * self.hidden
        chunk = self._chunks(x.shape[0] * x.shape[1])[0].stop
        mlp = 8 * chunk * inter * x.element_size()
        logits = self.config.loss_chunk * self.head.out_features * 6
        working = (16 * unit + mlp + logits) * 1.15
        return max(0, int((free - working) // unit))


class _GraphedLayers:
    """One batch shape's captured layers: static checkpoint buffers ``x[0..L]``, two gradient buffers, the graphs.

    Forward graph i reads ``x[i]`` and writes ``x[i + 1]``; backward graph i reads ``x[i]`` and the gradient of
    ``x[i + 1]`` (``dout[(i + 1) % 2]``) and writes the gradient of ``x[i]`` into ``dout[i % 2]``, accumulating the
    adapters' gradients into fixed buffers (``attach_grads`` puts them back under ``.grad`` when a caller set
    them to None or replaced them). Dropout seeds are read from the step's device seed, so replays draw new masks.

    ``offload``: ``x[i]`` is one of two device buffers (``x[i] is buf[i % 2]``) and checkpoints live in pinned CPU
    memory: after ``x[i]`` is written it is copied out on a side stream (graph ``i + 1``, which overwrites that
    buffer, waits for the copy), and in backward ``x[i - 1]`` is copied back in while graph ``i`` runs.
    """

    def __init__(self, fast: "FastStep", ids: torch.Tensor, seed: _Seed, offload: bool = False):
        n = len(fast.layers)
        self.n, self.offload = n, offload
        b, s = ids.shape
        dev, dtype = fast.device, fast.dtype
        self.params = [p for layer in fast.layers for p in layer.params()]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype, device=dev)
        self.grads = [g.view_as(p) for p, g in zip(self.params, self.flat.split([p.numel() for p in self.params]))]
        if offload:
            pair = [torch.empty(b, s, fast.hidden, dtype=dtype, device=dev) for _ in range(2)]
            self.x = [pair[i % 2] for i in range(n + 1)]
            # x[0..n-2] are overwritten during the forward; x[n-1] and x[n] are still in their buffers after it
            self.host = [torch.empty(b, s, fast.hidden, dtype=dtype, pin_memory=True) for _ in range(max(n - 1, 0))]
            self.copy_stream = torch.cuda.Stream()
        else:
            self.x = [torch.empty(b, s, fast.hidden, dtype=dtype, device=dev) for _ in range(n + 1)]
        self.dout = [torch.empty(b, s, fast.hidden, dtype=dtype, device=dev) for _ in range(2)]
        with torch.no_grad():
            self.x[0].copy_(F.embedding(ids, fast.core.embed_tokens.weight))
            positions = torch.arange(s, device=dev)[None].expand(b, s)
            self.cos, self.sin = fast.core.rotary_emb(self.x[0], positions)
        kept = [p.grad for p in self.params]
        self._attach()
        _Group.caching = False  # the adapters' casts must be recorded in the graphs, not cached beside them
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles, autotunes and allocates before capture
                self._run_forward(fast, range(n), seed)
                self.dout[n % 2].normal_(0, 1e-3)
                self._run_backward(fast, reversed(range(n)), seed)
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            self.forward, self.backward = [], []
            for i in range(n):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run_forward(fast, [i], seed)
                self.forward.append(graph)
            for i in reversed(range(n)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run_backward(fast, [i], seed)
                self.backward.append(graph)
        finally:
            _Group.caching = True
        self.flat.zero_()  # the warm-up's gradients are not the caller's
        for p, g, old in zip(self.params, self.grads, kept):
            if old is not None:
                g.copy_(old)

    def replay_forward(self) -> None:
        main = torch.cuda.current_stream()
        copied: list[torch.cuda.Event | None] = [None] * self.n
        for i, graph in enumerate(self.forward):
            if self.offload and i <= self.n - 2:  # save x[i] before graph i + 1 overwrites its buffer
                self.copy_stream.wait_stream(main)
                with torch.cuda.stream(self.copy_stream):
                    self.host[i].copy_(self.x[i], non_blocking=True)
                    copied[i] = self.copy_stream.record_event()
            if self.offload and i >= 1 and copied[i - 1] is not None:
                main.wait_event(copied[i - 1])  # graph i writes the buffer that held x[i - 1]
            graph.replay()

    def replay_backward(self) -> None:
        main = torch.cuda.current_stream()
        for graph, i in zip(self.backward, reversed(range(self.n))):
            loaded = None
            if self.offload and i >= 1:  # bring x[i - 1] back while graph i runs (it reads the other buffer)
                self.copy_stream.wait_stream(main)
                with torch.cuda.stream(self.copy_stream):
                    self.x[i - 1].copy_(self.host[i - 1], non_blocking=True)
                    loaded = self.copy_stream.record_event()
            graph.replay()
            if loaded is not None:
                main.wait_event(loaded)

    def _run_forward(self, fast: "FastStep", layers, seed: _Seed) -> None:
        with torch.no_grad():
            for i in layers:
                self.x[i + 1].copy_(fast._layer_forward(i, self.x[i], self.cos, self.sin, seed + LAYER_SEEDS * i))

    def _run_backward(self, fast: "FastStep", layers, seed: _Seed) -> None:
        for i in layers:
            dx = fast._layer_backward(i, self.x[i], self.dout[(i + 1) % 2], self.cos, self.sin,
                                      seed + LAYER_SEEDS * i, need_dx=i > 0)
            if dx is not None:
                self.dout[i % 2].copy_(dx)
            del dx

    def _attach(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def attach_grads(self) -> None:
        """Make every adapter's ``.grad`` the buffer the graphs accumulate into, keeping what it held."""
        current = [p.grad for p in self.params]
        if all(c is not None and c.data_ptr() == g.data_ptr() for c, g in zip(current, self.grads)):
            return
        if all(c is None for c in current):
            self.flat.zero_()
        else:
            for c, g in zip(current, self.grads):
                if c is None:
                    g.zero_()
                elif c.data_ptr() != g.data_ptr():
                    g.copy_(c)
        self._attach()


def _check_right_padded(mask: torch.Tensor, labels: torch.Tensor) -> None:
    """The fast step attends causally over every position: padding must be at the right end and unscored."""
    if mask.shape != labels.shape:
        raise ConfigError(f"attention_mask {tuple(mask.shape)} must have the shape of input_ids {tuple(labels.shape)}")
    m = mask.to(torch.int64)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ConfigError(
            "the fast step supports right padding only (each attention_mask row 1..1 0..0); left-padded or packed "
            "masks need the standard path (fast_step=False)"
        )
    if bool(((m == 0) & (labels != IGNORE_INDEX)).any()):
        raise ConfigError("padded positions (attention_mask 0) must have label -100")


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Token-mean causal-LM cross-entropy and its gradient w.r.t. ``hidden``, ``chunk`` tokens at a time.

    hidden ``[B, S, H]`` (the final norm's output), weight ``[V, H]`` (lm_head), labels ``[B, S]`` (position t is
    scored against label t + 1, as transformers shifts them; ``-100`` is not scored). Returns ``(loss float32 [],
    d loss / d hidden [B, S, H])``. The logits are the lm_head GEMM in the hidden dtype, then float32, as
    transformers computes them; their gradient ``softmax - onehot`` is formed in place in the float32 chunk.
    """
    b, s, h = hidden.shape
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # [N]
    flat = hidden.reshape(-1, h)
    n_valid = (targets != IGNORE_INDEX).sum()
    if int(n_valid) == 0:
        raise ConfigError("no position of this batch has a label to score (every label is -100)")
    acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 logits (float64 stays float64)
    inv = 1.0 / n_valid.to(acc)
    grad = torch.empty_like(flat)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, min(start + chunk, flat.shape[0]))
        logits = (flat[rows] @ weight.t()).to(acc)  # [c, V]
        t = targets[rows]
        valid = t != IGNORE_INDEX
        safe = t.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)  # [c]
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        total += ((lse - picked) * valid).sum()
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        probs[torch.arange(probs.shape[0], device=probs.device), safe] -= 1.0
        probs.mul_((valid.to(acc) * inv)[:, None])
        grad[rows] = probs.to(hidden.dtype) @ weight
        del logits, probs
    return total * inv, grad.view(b, s, h)


# --- pointwise ops: eager or compiled -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ops:
    rms_norm: object
    silu_mul: object
    rotate: object


_EAGER_OPS = _Ops(llama_ops.rms_norm, llama_ops.silu_mul, llama_ops.rotate)
_COMPILED: list[_Ops] = []


def _compiled_ops() -> _Ops:
    if not _COMPILED:
        c = torch.compile
        _COMPILED.append(_Ops(c(llama_ops.rms_norm), c(llama_ops.silu_mul), c(llama_ops.rotate)))
    return _COMPILED[0]
