"""``generate``: greedy continuation of one prompt on the fastest decoding path the model allows.

The public verb over :class:`holdall.serving.static_decode.StaticDecoder` (``holdall generate`` on the command
line): a Llama-shaped model (llama, mistral, qwen2) decodes over a static KV cache -- one CUDA graph per token on
a GPU, with holdall's 4-bit GEMV kernels for quantized layers (BENCHMARKS.md round 11: an int4 7B shape at ~553
tokens/s on an H200, 48% of its copy bandwidth; ~690 with ``int8_activations``, 60%), eagerly on a CPU. Any other
architecture falls back to transformers' ``generate`` (``engine="auto"``), which holdall's quantized layers also
run under. Greedy only: sampling, batches and many adapters are the serving engine's (``holdall serve``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError, UnsupportedModelError

ENGINES = ("auto", "static", "hf")


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced."""

    text: str  # the new text (special tokens skipped)
    tokens: list[int]  # the new token ids, up to and excluding the end-of-sequence token
    prompt_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens)
    engine: str  # "static" (StaticDecoder) or "hf" (transformers' generate)
    prefill_s: float  # the prompt's forward and the first token (static engine; NaN for hf)
    decode_s: float  # the steps after the first token (static); the whole call (hf)
    decode_tokens: int  # the tokens decode_s produced (an end-of-sequence token included)
    fallback_reason: str | None = None  # why engine="auto" took transformers' generate

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: ``decode_tokens / decode_s`` (static: the steps after the first token; hf: the whole call)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens > 0 and self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, *, chat: bool = False,
             engine: str = "auto", int8_activations: bool = False, cpu_int4: bool = False) -> Generation:
    """Greedy continuation of ``prompt`` by ``model`` (on whatever device it is), at most ``max_new_tokens``.

    chat: wrap the prompt as one user message in the tokenizer's chat template (with the assistant's turn opened).
    engine: ``"static"`` the static-cache decoder (refuses other architectures, naming why), ``"hf"``
        transformers' ``generate``, ``"auto"`` the first where it can run, else the second.
    int8_activations: decode steps multiply 4-bit integer weights by int8-rounded activations (W4A8; static
        engine only, see :class:`~holdall.serving.static_decode.StaticDecoder`).
    cpu_int4: on a CPU, run 4-bit integer layers of a bf16 model through torch's int4 matmul
        (:mod:`holdall.kernels.cpu_int4`: within bf16 rounding of the reference, not bit-identical) for this call.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty: pass some text to continue")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if tokenizer is None:
        raise ConfigError("this model came without a tokenizer; generate needs one to read the prompt")
    device = next(model.parameters()).device
    if cpu_int4:
        dtype = model.get_input_embeddings().weight.dtype
        if device.type != "cpu" or dtype != torch.bfloat16:
            raise ConfigError(f"cpu_int4 runs bf16 models on a CPU; this one is {dtype} on {device}: load it with "
                              "dtype=torch.bfloat16 on the CPU, or convert it with model.to(torch.bfloat16) (a "
                              "holdall-quantized directory keeps the dtype it was saved in)")
        from ..kernels.cpu_int4 import available, enabled, why_unsupported

        if not available():
            raise ConfigError(f"cpu_int4 needs torch's CPU int4 kernels, which this torch build ({torch.__version__}) "
                              "lacks (aten._weight_int4pack_mm_for_cpu): upgrade torch, or drop cpu_int4 "
                              "(--cpu-int4) to run the reference path")
        reasons = [why_unsupported(m) for m in model.modules() if hasattr(m, "scheme")]
        if not reasons or all(reasons):
            why = reasons[0] if reasons else "it has no quantized layers"
            raise ConfigError(f"cpu_int4 has nothing to run in this model ({why}); quantize it to 4-bit integers "
                              "with groups of 32..256 that tile its rows first (e.g. holdall quantize --method rtn "
                              "--bits 4 --group-size 64)")
        with enabled():
            return generate(model, tokenizer, prompt, max_new_tokens, chat=chat, engine=engine,
                            int8_activations=int8_activations)
    ids = torch.tensor(_prompt_ids(tokenizer, prompt, chat), dtype=torch.long, device=device)
    stops = _eos_ids(model, tokenizer)
    fallback = None
    if engine in ("auto", "static"):
        try:
            from .static_decode import StaticDecoder

            decoder = StaticDecoder(model, max_len=ids.numel() + max_new_tokens, int8_activations=int8_activations)
        except (UnsupportedModelError, ConfigError) as exc:
            if engine == "static" or int8_activations:
                raise
            fallback = str(exc)
        else:
            # the decoder stops early on one id (the tokenizer's); any other end-of-sequence id is cut below
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops, default=None)
            with torch.no_grad():
                result = decoder.generate(ids, max_new_tokens, eos_token_id=eos)
            return _finish(tokenizer, result.tokens, stops, ids.numel(), max_new_tokens, "static", result.prefill_s,
                           result.decode_s, len(result.tokens) - 1)
    if int8_activations:
        raise ConfigError("int8_activations runs in the static-cache decoder only; drop it for engine='hf'")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(stops) or None, pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new = out[0, ids.numel():].tolist()
    return _finish(tokenizer, new, stops, ids.numel(), max_new_tokens, "hf", float("nan"), seconds, len(new), fallback)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template; drop chat=True (--chat) to continue the raw text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (which may list several)."""
    found = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(extra, int):
        found.add(extra)
    elif extra is not None:
        found.update(int(e) for e in extra)
    return found


def _finish(tokenizer, tokens: list[int], stops: set[int], prompt_tokens: int, max_new_tokens: int, engine: str,
            prefill_s: float, decode_s: float, decode_tokens: int, fallback: str | None = None) -> Generation:
    """Cut at the first end-of-sequence token (the static decoder watches for one id only) and decode the text."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    kept = tokens[:end] if end is not None else tokens[:max_new_tokens]
    reason = "stop" if end is not None else "length"
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text, kept, prompt_tokens, reason, engine, prefill_s, decode_s, decode_tokens, fallback)
