"""Batch-1 greedy decoding with a static KV cache, captured as one CUDA graph per token (gpt-fast's recipe).

Why: Hugging Face ``generate`` at batch 1 spends most of each step in Python (cache objects, mask building,
module dispatch) and launching small kernels; on a 7B model it reaches a few percent of the GPU's memory
bandwidth, although a decode step only has to read every weight once. Here the step is a fixed sequence of
tensor ops on fixed-shape buffers:

* the KV cache is preallocated ``[layers, 1, kv_heads, max_len, head_dim]`` and written in place at the current
  position; a decode step's attention is one call of :class:`holdall.kernels.decode_attention.DecodeAttention`
  (rotary from a table, the cache write and attention over the slots written so far: one Triton launch per
  layer on CUDA), whose slot range is read from the device, so no shape depends on the position (the prompt's
  prefill takes the general path: ``index_copy_`` and SDPA under a mask);
* q/k/v and gate/up run as one stacked projection each (:func:`holdall.core.linear.stack_outputs`: one launch
  instead of three and two; the model's layers become views of the stacked weights);
* the token and its position live in one-element device tensors, so the step can be captured once as a CUDA
  graph and replayed for every token: one launch per token instead of hundreds;
* the layers' own modules compute everything (norms, the rotary table, the projections — float ``nn.Linear``,
  holdall's ``QuantLinear`` with its Triton GEMV on CUDA), so a quantized model decodes with its real kernels.

The prompt is prefilled by the same code with all its tokens at once (eager). Greedy only: this is the path
that measures how close decoding gets to the memory-bandwidth roofline (``bench/gpu_decode.py``); sampling,
batching and adapters are the serving engine's. On CPU the same step runs eagerly (no graph); tests check its
tokens and logits against transformers' ``generate`` and forward.

Supported: the Llama-shaped families (``h = x + attn(norm(x)); y = h + mlp(norm(h))`` with rotary q/k, no
per-head q/k norms, full attention): llama, mistral (its sliding window is refused when shorter than
``max_len``), qwen2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.linear import stack_outputs, why_not_stackable
from ..errors import ConfigError, UnsupportedModelError
from ..kernels.decode_attention import DecodeAttention
from ..models.families import get_family
from ..models.llama_ops import add_rms_norm as _add_rms_norm
from ..models.llama_ops import rms_norm as _rms_norm
from ..models.llama_ops import rotate as _rotate
from ..models.llama_ops import silu_mul as _silu_mul

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class DecodeResult:
    """What :meth:`StaticDecoder.generate` produced and how long it took."""

    tokens: list[int]  # the new tokens (the prompt excluded)
    prefill_s: float
    decode_s: float  # the decode steps after the first token (wall time, synchronized)

    @property
    def tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class StaticDecoder:
    """Greedy batch-1 decoding of a Llama-shaped causal LM with a static KV cache.

    model: a transformers causal LM (float or holdall-quantized linears), on the device it should run on.
    max_len: prompt + generated tokens the cache holds.
    cuda_graph: capture the decode step as a CUDA graph (default: on CUDA devices).
    compile: fuse the decode step's pointwise pieces (RMSNorm with its residual add, rotary, SiLU x up) with
        ``torch.compile``, each into one kernel (default: on CUDA devices, where a 7B step otherwise spends ~2 ms
        launching ~40 small kernels per layer). The projections are never compiled: they run their own kernels.
    fused_attention: run a decode step's attention as :class:`holdall.kernels.decode_attention.DecodeAttention`
        (rotary from a precomputed table, the cache write and flash-decoding attention over the written slots in
        one Triton launch on CUDA; its plain-torch reference elsewhere). Default: on, unless the rotary depends
        on the sequence length (dynamic NTK, LongRoPE), which the table cannot hold. The prompt's prefill always
        takes the general path.
    stack_projections: run a decode step's q/k/v projections as one layer and gate/up as another
        (:func:`holdall.core.linear.stack_outputs`: one launch each; the model's layers become views of the
        stacked weights, so no memory is added). Default: on wherever the layers can be stacked (float linears,
        4-bit formats without double quantization). The model must not be modified while the decoder is used.
    fuse_norms: fold the residual adds and the RMSNorms between projections into the 4-bit GEMVs' epilogues
        (:func:`holdall.kernels.dispatch.fused_gemv`): o_proj and down_proj add the residual and also write the
        next norm's weighted row and partial sums of squares, and the projections after them scale by
        ``1 / rms``; the stacked gate/up GEMV also writes ``silu(gate) * up`` itself. A layer is then five
        launches (q/k/v, attention, o_proj, gate/up, down) instead of eight. Needs every projection of every
        block on a one-row kernel with these epilogues -- the TMA GEMV (Hopper, 4-bit, bf16/fp16) or the Gluon
        GEMV (int symmetric codes; :mod:`holdall.kernels.gluon_wq4`) -- and fused attention. Default (None): on
        wherever that holds (int4 7B shape on an H200: 464 against 440 tokens/s, BENCHMARKS.md round 8; the
        SiLU in the epilogue 486 against 473, round 9), off elsewhere; ``True`` raises naming the layer that
        cannot.
    int8_activations: in each decode step, round every 4-bit projection's input to int8 per 8-input word
        (power-of-two scales; :func:`holdall.kernels.packed.quantize_activations_s8`) and multiply the int codes
        with integer dot products -- W4A8, as llama.cpp's GPU kernels do with their int8 activation blocks.
        On Hopper the rounding happens inside the GEMV (``XQ8``); elsewhere the activations are rounded in
        torch first, so every device computes the same thing. The prompt's prefill keeps float activations;
        float (unquantized) projections are untouched. Needs 4-bit integer formats (codebook values are not
        integers): ``True`` on an NF4/FP4 model raises. With folded norms o_proj and down_proj write the next
        row already as those int8 words (the same numbers). Off by default: it changes the numbers (~0.6%
        relative per projection output on random activations; see BENCHMARKS.md for perplexity).
    """

    def __init__(self, model: nn.Module, max_len: int, cuda_graph: bool | None = None, compile: bool | None = None,
                 fused_attention: bool | None = None, stack_projections: bool = True, fuse_norms: bool | None = None,
                 int8_activations: bool = False):
        family = get_family(model)
        if family.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"static decoding supports {', '.join(SUPPORTED)}; {family.model_type} is not Llama-shaped here "
                "(per-head q/k norms, extra norms or a fused projection). Use holdall serve or transformers' generate"
            )
        if not isinstance(max_len, int) or max_len < 2:
            raise ConfigError(f"max_len must be an integer >= 2, got {max_len!r}")
        config = model.config
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and window < max_len:
            raise ConfigError(
                f"the model attends over a sliding window of {window} tokens; static decoding attends over the whole "
                f"cache. Use max_len <= {window}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"static decoding fuses a SiLU-gated MLP; this model's activation is {act!r}")
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not hasattr(norm, "variance_epsilon"):
                    raise UnsupportedModelError(
                        f"static decoding computes RMSNorm itself; {type(norm).__name__} is not a recognised RMSNorm"
                    )
        self.model = model
        self.core = model.model
        self.layers = list(self.core.layers)
        self.max_len = max_len
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        weight = self.core.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (len(self.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_positions = torch.arange(max_len, device=self.device)
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.use_graph and self.device.type != "cuda":
            raise ConfigError("cuda_graph=True needs the model on a CUDA device")
        # the decode step's fixed buffers (the graph reads and writes these addresses)
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        use_compile = self.device.type == "cuda" if compile is None else bool(compile)
        self._ops = _Pointwise.compiled() if use_compile else _EAGER
        self._attend = self._plan_attention(fused_attention)
        self._qkv: list[nn.Module | None] = [None] * len(self.layers)
        self._gate_up: list[nn.Module | None] = [None] * len(self.layers)
        if stack_projections:
            self._stack_projections()
        self._fuse_norms = self._plan_norm_fusion(fuse_norms)
        self._int8 = self._plan_int8(int8_activations)
        # with int8 activations and folded norms, o_proj / down_proj hand the next row over as int8 words (the
        # same numbers; fewer instructions in the next GEMV; H200: +0.4-0.6% in four runs, BENCHMARKS.md round 9)
        self._int8_handoff = True
        # with folded norms, the stacked gate/up GEMV writes silu(gate) * up itself (no activation launch)
        self._glu = True

    def _plan_norm_fusion(self, wanted: bool | None) -> bool:
        """Whether the decode step folds norms and residual adds into the 4-bit GEMVs (see ``fuse_norms``)."""
        if wanted is False:
            return False
        reason = None if self._attend is not None else "attention is not fused (fused_attention)"
        if reason is None:
            from ..kernels.dispatch import norm_fusable

            for i, layer in enumerate(self.layers):
                for name, module in self._block_projections(i):
                    if not norm_fusable(module, self.dtype):
                        reason = f"layers.{i}.{name} does not run a one-row kernel with the norm epilogues"
                        break
                norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                if reason is None and any(w.dtype != self.dtype or not w.is_contiguous() for w in norms):
                    reason = f"layers.{i}'s norm weights are not contiguous {self.dtype}"
                if reason is not None:
                    break
        if reason is not None and wanted:
            raise ConfigError(f"fuse_norms=True cannot be honoured: {reason}. Leave fuse_norms unset")
        return reason is None

    def _plan_int8(self, wanted: bool) -> bool:
        """Whether decode steps round the 4-bit projections' inputs to int8 (see ``int8_activations``)."""
        if not wanted:
            return False
        from ..kernels.dispatch import int8_ready

        for i in range(len(self.layers)):
            for name, module in self._block_projections(i):
                reason = int8_ready(module)
                if reason is not None and hasattr(module, "scheme"):  # float projections are left alone
                    raise ConfigError(f"int8_activations=True cannot be honoured: layers.{i}.{name}: {reason}. "
                                      "Leave int8_activations off")
        return True

    def _project(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """A decode step's projection: ``module(h)``, with int8 activations where asked and possible."""
        if self._int8 and hasattr(module, "scheme"):
            from ..kernels.dispatch import project_int8

            return project_int8(module, h)
        return module(h)

    def _block_projections(self, index: int) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of block ``index``'s projections as the decode step runs them (stacked or not)."""
        attn, mlp = self.layers[index].self_attn, self.layers[index].mlp
        qkv = [("qkv", self._qkv[index])] if self._qkv[index] is not None else [
            ("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj)]
        gate_up = [("gate_up", self._gate_up[index])] if self._gate_up[index] is not None else [
            ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)]
        return qkv + [("o_proj", attn.o_proj)] + gate_up + [("down_proj", mlp.down_proj)]

    def _stack_projections(self) -> None:
        """One stacked layer per block for q/k/v (used by the fused attention step) and for gate/up."""
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            if self._attend is not None and why_not_stackable(qkv) is None:
                self._qkv[i] = stack_outputs(qkv)
            if why_not_stackable([mlp.gate_proj, mlp.up_proj]) is None:
                self._gate_up[i] = stack_outputs([mlp.gate_proj, mlp.up_proj])

    def _plan_attention(self, fused: bool | None) -> DecodeAttention | None:
        """The fused decode-attention step and its rotary table ``[max_len, head_dim]``, or None (general path)."""
        rope_type = str(getattr(self.core.rotary_emb, "rope_type", "default"))
        position_dependent = "dynamic" in rope_type or "longrope" in rope_type
        if fused is None:
            fused = not position_dependent
        if not fused:
            return None
        if position_dependent:
            raise ConfigError(f"fused_attention=True needs a fixed rotary table; this model's rope type {rope_type!r} "
                              "changes with the sequence length. Leave fused_attention unset")
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.device)
        cos, sin = self.core.rotary_emb(probe, self.cache_positions[None])  # [1, max_len, head_dim]
        self._cos, self._sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        return DecodeAttention(self.n_heads, self.n_kv, self.head_dim, self.max_len, self.device, self.dtype)

    # --- the forward over the static cache -------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ops: "_Pointwise | None" = None) -> torch.Tensor:
        """Logits ``[T, vocab]`` (float32) of tokens ``ids [1, T]`` at ``positions [T]``; writes their K/V.

        ops: the pointwise pieces (norms, residual adds, rotary, SiLU gate); the decode step passes compiled ones.
        """
        ops = ops or _EAGER
        if self._fuse_norms and ids.shape[1] == 1:
            return self._fused_step(ids, positions, ops)
        x = self.core.embed_tokens(ids)  # [1, T, hidden]
        if self._attend is not None and ids.shape[1] == 1:  # one token: the fused step reads its own tables
            cos = sin = mask = None
        else:
            cos, sin = self.core.rotary_emb(x, positions[None])
            # token t attends to cache slots 0..positions[t]
            mask = self.cache_positions[None, :] <= positions[:, None]  # [T, max_len]
        norms = [layer.input_layernorm for layer in self.layers] + [self.core.norm]
        h = ops.rms_norm(x, norms[0].weight, norms[0].variance_epsilon)
        for i, layer in enumerate(self.layers):
            attn = self._attention(layer.self_attn, h, cos, sin, positions, mask, i, ops)
            post = layer.post_attention_layernorm
            x, h = ops.add_rms_norm(x, attn, post.weight, post.variance_epsilon)
            mlp = layer.mlp
            project = self._project if ids.shape[1] == 1 else _call
            if self._gate_up[i] is not None and ids.shape[1] == 1:
                gate, up = project(self._gate_up[i], h).chunk(2, dim=-1)
            else:
                gate, up = project(mlp.gate_proj, h), project(mlp.up_proj, h)
            update = project(mlp.down_proj, ops.silu_mul(gate, up))
            x, h = ops.add_rms_norm(x, update, norms[i + 1].weight, norms[i + 1].variance_epsilon)
        return self.model.lm_head(h)[0].float()

    def _fused_step(self, ids: torch.Tensor, positions: torch.Tensor, ops: "_Pointwise") -> torch.Tensor:
        """One decode token with the residual adds and the norms between projections folded into the 4-bit
        GEMVs' epilogues (``fuse_norms``): o_proj and down_proj add the residual and emit the next norm's
        weighted row and sums of squares; the projections after them apply ``1 / rms``."""
        from ..kernels.dispatch import fused_gemv

        int8 = self._int8  # the consumers round the norm-weighted row h (before 1 / rms) to int8
        handoff = int8 and self._int8_handoff  # ... or the producers do, in their epilogues

        def project(layer, row, **options):
            # no kernel of a decode step writes weights: each GEMV may load its own before the kernel ahead ends
            return fused_gemv(layer, row, int8_activations=int8, chained=True, **options)

        x = self.core.embed_tokens(ids).reshape(-1)  # [hidden]: the residual stream
        first = self.layers[0].input_layernorm
        h, squares = ops.rms_norm(x, first.weight, first.variance_epsilon), None  # layer 0's norm stands alone
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            pre, post = layer.input_layernorm, layer.post_attention_layernorm
            norm_in = None if squares is None else (squares, pre.variance_epsilon)
            if self._qkv[i] is not None:
                q, k, v = project(self._qkv[i], h, norm_in=norm_in, dtype=self.dtype).y.split(
                    [q_width, kv_width, kv_width])
            else:
                q, k, v = (project(m, h, norm_in=norm_in, dtype=self.dtype).y
                           for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = self._attend(q, k, v, self.k_cache[i, 0], self.v_cache[i, 0], positions, self._cos, self._sin,
                               getattr(attn, "scaling", None))
            x, h, squares, h8 = project(attn.o_proj, out, residual=x, norm_out=post.weight, int8_out=handoff)
            h = h8 if h8 is not None else h
            norm_in = (squares, post.variance_epsilon)
            if self._gate_up[i] is not None and self._glu:  # silu(gate) * up from the GEMV's epilogue
                inner = project(self._gate_up[i], h, norm_in=norm_in, dtype=self.dtype, glu=True).y
            else:
                if self._gate_up[i] is not None:
                    gate, up = project(self._gate_up[i], h, norm_in=norm_in, dtype=self.dtype).y.chunk(2)
                else:
                    gate, up = (project(m, h, norm_in=norm_in, dtype=self.dtype).y
                                for m in (mlp.gate_proj, mlp.up_proj))
                inner = ops.silu_mul(gate, up)
            following = None if i == last else self.layers[i + 1].input_layernorm.weight
            x, h, squares, h8 = project(mlp.down_proj, inner, residual=x, norm_out=following,
                                        int8_out=handoff and following is not None)
            h = h8 if h8 is not None else h
        final = self.core.norm
        h = ops.rms_norm(x.view(1, 1, -1), final.weight, final.variance_epsilon)
        return self.model.lm_head(h)[0].float()

    def _attention(self, attn: nn.Module, h: torch.Tensor, cos, sin, positions, mask, index: int, ops) -> torch.Tensor:
        T = h.shape[1]
        if mask is None:  # one decode token through the fused step
            if self._qkv[index] is not None:
                width = self.n_kv * self.head_dim
                q, k, v = self._project(self._qkv[index], h).split([self.n_heads * self.head_dim, width, width],
                                                                    dim=-1)
            else:
                q, k, v = (self._project(m, h) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = self._attend(q, k, v, self.k_cache[index, 0], self.v_cache[index, 0], positions, self._cos,
                               self._sin, getattr(attn, "scaling", None))
            return self._project(attn.o_proj, out.view(1, 1, -1))
        project = self._project if T == 1 else _call
        q = project(attn.q_proj, h).view(1, T, self.n_heads, self.head_dim).transpose(1, 2)  # [1, heads, T, d]
        k = project(attn.k_proj, h).view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(attn.v_proj, h).view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = ops.rotate(q, k, cos, sin)
        k_all, v_all = self.k_cache[index], self.v_cache[index]  # [1, kv, max_len, d]
        k_all.index_copy_(2, positions, k.to(k_all.dtype))
        v_all.index_copy_(2, positions, v.to(v_all.dtype))
        # grouped-query attention: each kv head serves n_heads / n_kv query heads, read in place (no copies)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[None, None],
                                             scale=getattr(attn, "scaling", None),
                                             enable_gqa=self.n_kv != self.n_heads)
        return project(attn.o_proj, out.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim))

    # --- prefill and the captured step ---------------------------------------------------------------------
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Write the prompt's K/V (``prompt [1, P]`` or ``[P]``); return the last position's logits ``[vocab]``."""
        prompt = prompt.reshape(1, -1).to(self.device)
        n = prompt.shape[1]
        if n < 1 or n >= self.max_len:
            raise ConfigError(f"the prompt has {n} tokens; it must have 1..{self.max_len - 1} (max_len {self.max_len})")
        return self.forward(prompt, torch.arange(n, device=self.device))[-1]

    def _step(self) -> torch.Tensor:
        return self.forward(self._token, self._position, self._ops)[-1]

    def _capture(self) -> None:
        """Warm the step up on a side stream (allocator, Triton autotuning), then capture it as a CUDA graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        saved = self.k_cache.clone(), self.v_cache.clone()  # warm-up steps write a slot; keep the prompt's cache
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step()
        self.k_cache.copy_(saved[0])
        self.v_cache.copy_(saved[1])
        self._graph = graph

    def step(self, token: int | torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[vocab]`` of one token at ``position`` (its K/V written into the cache)."""
        self._token.fill_(token) if isinstance(token, int) else self._token.copy_(token.reshape(1, 1))
        self._position.fill_(position) if isinstance(position, int) else self._position.copy_(position.reshape(1))
        if not self.use_graph:
            return self._step()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> DecodeResult:
        """Greedy tokens after ``prompt``; the timing excludes the graph capture (done before the clock starts)."""
        prompt = prompt.reshape(-1)
        if max_new_tokens < 1 or prompt.numel() + max_new_tokens > self.max_len:
            raise ConfigError(
                f"{prompt.numel()} prompt + {max_new_tokens} new tokens do not fit max_len {self.max_len}"
            )
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if self.use_graph and self._graph is None:
            self._capture()
        sync()
        start = time.perf_counter()
        token = self.prefill(prompt).argmax()
        sync()
        prefill_s = time.perf_counter() - start
        # tokens stay on the device until the end (no host sync per token) unless an EOS must be watched for
        produced = [token]
        position = prompt.numel()
        start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            token = self.step(token, position).argmax()
            produced.append(token)
            position += 1
            if eos_token_id is not None and int(token) == eos_token_id:
                break
        sync()
        decode_s = time.perf_counter() - start
        return DecodeResult([int(t) for t in produced], prefill_s, decode_s)


def _call(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module(h)


@dataclass(frozen=True)
class _Pointwise:
    rms_norm: object
    add_rms_norm: object
    silu_mul: object
    rotate: object

    @classmethod
    def compiled(cls) -> "_Pointwise":
        def c(fn):
            return torch.compile(fn, dynamic=False, fullgraph=True)

        return cls(c(_rms_norm), c(_add_rms_norm), c(_silu_mul), c(_rotate))


_EAGER = _Pointwise(_rms_norm, _add_rms_norm, _silu_mul, _rotate)
