"""The generation engine: one base model, many LoRA adapters, one scheduler thread batching every request.

Requests for any mix of adapters (and the base) share each forward pass: ``adapter_rows`` routes batch row i
through its own adapter (Punica / S-LoRA style), so the base weights are read once per step however many
customers are in the batch.

Continuous batching: between two decode steps the scheduler admits waiting requests. Newcomers are prefilled
in passes of their own (left-padded, grouped by prompt length to bound the padding, with their own adapters),
then their KV cache is spliced onto the running batch (``kvcache.concat``); finished rows leave the batch (``kvcache.select_rows``). Every row keeps
its own position ids and attention mask, so it computes what it would compute served alone (up to float
rounding of different batch shapes; see docs/architecture.md, "serving/").

Threads: HTTP handlers call :meth:`Engine.submit` from the event loop and receive :class:`StreamEvent`s
through a ``sink`` callable that the scheduler thread invokes (the app forwards them into an asyncio queue
with ``loop.call_soon_threadsafe``). Adapter load / unload are handed to the scheduler thread, which runs them
between two steps: the model is only ever touched by one thread, and a load cannot starve behind a busy batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from holdall.errors import ConfigError, UnsupportedModelError
from holdall.serving import kvcache
from holdall.serving.config import EngineConfig
from holdall.serving.errors import (
    AdapterInUseError,
    EngineStoppedError,
    GenerationFailedError,
    QueueFullError,
    RequestTooLargeError,
    UnknownModelError,
)
from holdall.serving.sampling import SamplingParams, TextStream, sample_rows
from holdall.tuners.lora import adapter_rows, delete_adapter, load_adapter, lora_layers, set_adapter

log = logging.getLogger("holdall.serve")

STATE_ATTR = "holdall_lora"  # where tuners.lora keeps the adapters a model carries


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids, sampling parameters, and the adapter (None: the base)."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))


@dataclass(frozen=True)
class StreamEvent:
    """What the engine sends a request: text as it is generated, then one final event.

    The final event has ``finish_reason`` ("stop": EOS or a stop string, "length": max_tokens) or ``error``,
    the token counts, and ``token_ids``: every generated id (an EOS that ended the output counts as
    generated but is not in ``token_ids`` and has no text).
    """

    delta: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Sink = Callable[[StreamEvent], None]


class RequestHandle:
    """Returned by :meth:`Engine.submit`: cancel a request whose client went away."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        # read by the scheduler thread between steps; a bool store is atomic under the GIL
        self.cancelled = True


class _Sequence:
    """A request while it waits or runs: its output so far and where it stands in the KV cache."""

    def __init__(self, request: GenerationRequest, sink: Sink, handle: RequestHandle, stream: TextStream):
        self.request = request
        self.sink = sink
        self.handle = handle
        self.text = stream
        self.generator: torch.Generator | None = None
        self.output_ids: list[int] = []
        self.completion_tokens = 0
        self.length = 0  # real (non-padding) tokens of this row in the KV cache; the next position id
        self.last_token: int | None = None  # sampled but not yet fed to the model
        self.finished = False

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass
class EngineStats:
    """Counters for /stats, the benchmark and the tests (``mixed_steps``: passes with rows of 2+ adapters)."""

    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    tokens_generated: int = 0
    prefill_passes: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0
    max_batch_seen: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Engine:
    """Generation for one base model and its named LoRA adapters; see the module docstring.

    ``Engine(model, tokenizer, EngineConfig(...))`` adopts the adapters the model already carries; more come
    with :meth:`load_adapter`. Call :meth:`start` (or use ``with engine:``) to run the scheduler thread.
    """

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_arg = kvcache.cache_kwarg(model)
        self._keeps_last_logits = "logits_to_keep" in _forward_params(model)
        self._adapters: dict[str, str | None] = {name: None for name in _model_adapters(model)}
        self._in_use: collections.Counter[str] = collections.Counter()
        self._refuse_merged_adapters()
        if self._adapters:
            set_adapter(model, [])  # outside the engine's batches the model is the plain base
        self.stats = EngineStats()
        # _cond guards the queue, the model tasks, the adapter registry and the in-use counts (re-entrant:
        # _release also runs inside _admit). The model itself belongs to the scheduler thread while it runs.
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._model_tasks: collections.deque[tuple[Callable[[], object], concurrent.futures.Future]] = (
            collections.deque())
        self._running: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="holdall-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler; queued and running requests end with an ``EngineStoppedError``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        stopped = EngineStoppedError("the server is shutting down")
        self._fail(list(self._queue) + self._running, stopped)
        self._queue.clear()
        self._drop_batch()
        with self._cond:
            tasks, self._model_tasks = list(self._model_tasks), collections.deque()
        for _, future in tasks:
            future.set_exception(stopped)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- adapters -------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        with self._cond:
            return sorted(self._adapters)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT-format adapter as ``name`` while serving (between two steps).

        An adapter made for another base raises holdall's ``UnsupportedModelError`` naming that base.
        Adapters that train biases are refused: their biases would change the shared base for every request.
        """
        _refuse_trained_biases(Path(path))
        with self._cond:
            if name in self._adapters:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        self._on_model(lambda: load_adapter(self.model, path, name, activate=False))
        with self._cond:
            self._adapters[name] = str(path)
        log.info("loaded adapter %s from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; refused while requests for it are queued or running."""
        with self._cond:
            if name not in self._adapters:
                raise UnknownModelError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._adapters)}")
            if self._in_use[name]:
                raise AdapterInUseError(
                    f"adapter {name!r} has {self._in_use[name]} request(s) queued or running; unload it once they "
                    "finish (stop sending it requests, then retry)"
                )
            del self._adapters[name]  # from here on, new requests for it are refused as unknown
        self._on_model(lambda: delete_adapter(self.model, name))
        log.info("unloaded adapter %s", name)

    def _on_model(self, task: Callable[[], object]) -> object:
        """Run ``task`` (which changes the model) between two steps, on the scheduler thread; wait for it."""
        with self._cond:
            if not self.running:  # no scheduler: nothing else touches the model
                return task()
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._model_tasks.append((task, future))
            self._cond.notify_all()
        return future.result()

    def in_use(self, name: str) -> int:
        with self._cond:
            return self._in_use[name]

    # --- requests -------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise the error the request would get at submit, without queueing it (limits, adapter, vocabulary)."""
        n_prompt, max_tokens = len(request.prompt_ids), request.params.max_tokens
        limits = self.config
        if n_prompt == 0:
            raise ConfigError("the prompt is empty (no tokens); send some text")
        if n_prompt > limits.max_prompt_tokens:
            raise RequestTooLargeError(
                f"the prompt has {n_prompt} tokens; this server accepts at most {limits.max_prompt_tokens} "
                "(max_prompt_tokens, --max-prompt-tokens); shorten the prompt"
            )
        if max_tokens > limits.max_new_tokens:
            raise RequestTooLargeError(
                f"max_tokens is {max_tokens}; this server generates at most {limits.max_new_tokens} tokens per "
                "request (max_new_tokens, --max-new-tokens); ask for fewer"
            )
        if self.max_context is not None and n_prompt + max_tokens > self.max_context:
            raise RequestTooLargeError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.max_context} tokens; shorten the prompt or lower max_tokens"
            )
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue ``request``; ``sink`` receives its :class:`StreamEvent`s from the scheduler thread.

        Raises (before queueing) ``UnknownModelError``, ``RequestTooLargeError``, ``QueueFullError`` or
        ``EngineStoppedError``; after that, failures arrive as a final event with ``error`` set.
        """
        self.check(request)
        stream = TextStream(self.tokenizer, request.prompt_ids, request.params.stop)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down; retry against a running server")
            if request.adapter is not None and request.adapter not in self._adapters:
                raise UnknownModelError(
                    f"no adapter named {request.adapter!r} is loaded; loaded: {sorted(self._adapters)}"
                )
            if len(self._queue) >= self.config.max_queued_requests:
                raise QueueFullError(
                    f"{len(self._queue)} requests are already waiting (max_queued_requests, --max-queue); "
                    "retry shortly"
                )
            handle = RequestHandle(next(self._ids))
            self._queue.append(_Sequence(request, sink, handle, stream))
            if request.adapter is not None:
                self._in_use[request.adapter] += 1
            self._cond.notify()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and wait (for scripts and tests; the HTTP app streams instead)."""
        events: queue.Queue[StreamEvent] = queue.Queue()
        self.submit(request, events.put)
        parts = []
        while True:
            event = events.get(timeout=timeout)
            parts.append(event.delta)
            if event.error is not None:
                raise event.error
            if event.final:
                return GenerationResult("".join(parts), event.token_ids, event.finish_reason,
                                        event.prompt_tokens, event.completion_tokens)

    # --- the scheduler --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            admitted = self._admit()
            if admitted is None:
                return
            self._run_model_tasks()
            try:
                with torch.inference_mode():
                    for group in _prefill_groups(admitted):
                        self._prefill(group)
                    self._drop_cancelled()
                    if self._running:
                        self._decode_step()
            except Exception as exc:  # one bad batch must not take the server down
                log.exception("generation failed for a batch of %d requests", len(self._running) + len(admitted))
                failed = GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}")
                self._fail([s for s in admitted if not s.finished] + self._running, failed)
                self._drop_batch()

    def _admit(self) -> list[_Sequence] | None:
        """Waiting requests that join the batch now (blocks while there is no work); None when stopping."""
        with self._cond:
            while not (self._stopping or self._queue or self._running or self._model_tasks):
                self._cond.wait()
            if self._stopping:
                return None
            self._purge_cancelled_queue()
            room = self.config.max_batch_size - len(self._running)
            if room <= 0 or (self._running and not self.config.continuous_batching):
                return []
            if self.config.mixed_batches:
                chosen = list(itertools.islice(self._queue, room))
            else:
                chosen = self._same_adapter(room)
            for seq in chosen:
                self._queue.remove(seq)
            return chosen

    def _run_model_tasks(self) -> None:
        """Adapter loads / unloads asked for since the last step (outside inference_mode: they create weights)."""
        while True:
            with self._cond:
                if not self._model_tasks:
                    return
                task, future = self._model_tasks.popleft()
            try:
                future.set_result(task())
            except BaseException as exc:  # handed to the caller, which raises it
                future.set_exception(exc)

    def _same_adapter(self, room: int) -> list[_Sequence]:
        """Without mixed batches: only requests for the running batch's adapter (else the oldest waiting one's).

        Requests are grouped by adapter regardless of arrival order, the strongest one-adapter-at-a-time
        policy (not a fair one: a steady stream for one adapter would hold the others back).
        """
        adapter = self._running[0].adapter if self._running else self._queue[0].adapter
        return [s for s in self._queue if s.adapter == adapter][:room]

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Run newcomers' prompts (left-padded) in one pass, sample their first token, join the running batch."""
        ids, mask = _left_pad([s.request.prompt_ids for s in seqs], self.device)  # [b, L]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts only its own tokens
        cache = kvcache.new_cache()
        logits = self._forward(ids, mask, positions, cache, [s.adapter for s in seqs], last_only=True)
        self.stats.prefill_passes += 1
        for seq in seqs:
            seq.length = len(seq.request.prompt_ids)
            seq.generator = seq.params.make_generator(self.device)
        if self._running:
            self._mask = kvcache.concat(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._running.extend(seqs)
        self._advance(seqs, logits)
        self._remove_finished()

    def _decode_step(self) -> None:
        """Feed every row its pending token; sample the next one."""
        rows = self._running
        tokens = torch.tensor([[s.last_token] for s in rows], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.length] for s in rows], device=self.device)  # [B, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)  # [B, T+1]
        logits = self._forward(tokens, self._mask, positions, self._cache, [s.adapter for s in rows])
        self.stats.decode_steps += 1
        for seq in rows:
            seq.length += 1
        self._advance(rows, logits)
        self._remove_finished()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 adapters: Sequence[str | None], last_only: bool = False) -> torch.Tensor:
        """Logits of the last position of each row, ``[B, vocab]``, with row i through ``adapters[i]``."""
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if last_only and self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions never need the vocabulary projection
        with self._row_adapters(adapters):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(adapters))
        if len(set(adapters)) > 1:
            self.stats.mixed_steps += 1
        return out.logits[:, -1, :]

    def _row_adapters(self, adapters: Sequence[str | None]):
        if getattr(self.model, STATE_ATTR, None) is None:
            return contextlib.nullcontext()  # no adapter was ever loaded: every row is the base
        return adapter_rows(self.model, adapters)

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record one sampled token: stream its text, or end the request (EOS, stop string, max_tokens)."""
        seq.completion_tokens += 1
        self.stats.tokens_generated += 1
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(token)
        seq.last_token = token
        delta = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", delta)
        elif seq.completion_tokens >= seq.params.max_tokens:
            self._finish(seq, "length", delta)
        elif delta:
            self._send(seq, StreamEvent(delta=delta))

    def _finish(self, seq: _Sequence, reason: str, delta: str = "") -> None:
        seq.finished = True
        self.stats.requests_finished += 1
        self._release(seq)
        self._send(seq, StreamEvent(
            delta=delta + seq.text.finish(), finish_reason=reason, prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=seq.completion_tokens, token_ids=tuple(seq.output_ids),
        ))

    def _send(self, seq: _Sequence, event: StreamEvent) -> None:
        try:
            seq.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): stop generating for it
            log.debug("request %d: sink failed, cancelling", seq.handle.request_id, exc_info=True)
            seq.handle.cancel()

    def _release(self, seq: _Sequence) -> None:
        if seq.adapter is not None:
            with self._cond:
                self._in_use[seq.adapter] -= 1
                if self._in_use[seq.adapter] <= 0:
                    del self._in_use[seq.adapter]

    def _purge_cancelled_queue(self) -> None:
        """Queued requests whose client went away never start (called with ``_cond`` held)."""
        for seq in [s for s in self._queue if s.handle.cancelled]:
            self._queue.remove(seq)
            self._cancelled(seq)

    def _drop_cancelled(self) -> None:
        """Running rows whose client went away leave before the next step."""
        for seq in self._running:
            if seq.handle.cancelled and not seq.finished:
                self._cancelled(seq)
        self._remove_finished()

    def _cancelled(self, seq: _Sequence) -> None:
        seq.finished = True  # no final event: nobody is listening any more
        self.stats.requests_cancelled += 1
        self._release(seq)

    def _remove_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._drop_batch()
            return
        self._running = [self._running[i] for i in keep]
        self._mask = kvcache.select_rows(self._cache, self._mask, torch.tensor(keep, device=self._mask.device))
        self._mask = kvcache.trim_left(self._cache, self._mask)

    def _drop_batch(self) -> None:
        self._running, self._cache, self._mask = [], None, None

    def _fail(self, seqs: list[_Sequence], error: Exception) -> None:
        for seq in seqs:
            if seq.finished:
                continue
            seq.finished = True
            self.stats.requests_failed += 1
            self._release(seq)
            self._send(seq, StreamEvent(error=error, prompt_tokens=len(seq.request.prompt_ids),
                                        completion_tokens=seq.completion_tokens))

    def _refuse_merged_adapters(self) -> None:
        merged = [path for path, layer in lora_layers(self.model) if layer.merged_adapters]
        if merged:
            raise ConfigError(
                f"adapters are merged into the base weights ({merged[0]}, ...), so every request would get them; "
                "unmerge them (unmerge_adapters) or serve the merged model without adapters"
            )


# --- helpers ---------------------------------------------------------------------------------------------
def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, L]`` (padding id 0: never attended to) and ``mask [B, L]`` with prompts aligned to the right."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _prefill_groups(seqs: list[_Sequence], max_padding: float = 0.25) -> list[list[_Sequence]]:
    """Newcomers split into prefill passes whose left padding stays under ``max_padding`` of the real tokens.

    Prefill is compute-bound: one pass over a 40-token and a 400-token prompt would compute 800 positions for
    440 real ones. Prompts are sorted by length and a pass closes when the next, longer prompt would pad it
    beyond the budget; similar lengths still share a pass.
    """
    groups: list[list[_Sequence]] = []
    current: list[_Sequence] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.request.prompt_ids)):
        n = len(seq.request.prompt_ids)  # ascending: the newest member is the longest
        if current and n * (len(current) + 1) > (1 + max_padding) * (real + n):
            groups.append(current)
            current, real = [], 0
        current.append(seq)
        real += n
    if current:
        groups.append(current)
    return groups


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (chat models often add one)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _model_adapters(model: nn.Module) -> list[str]:
    state = getattr(model, STATE_ATTR, None)
    return list(state.configs) if state is not None else []


def _refuse_trained_biases(adapter_dir: Path) -> None:
    """Adapters with ``bias`` "all" / "lora_only" overwrite the base's biases on load: refused when serving."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return  # load_adapter reports the missing file with its own message
    try:
        bias = json.loads(config_file.read_text()).get("bias", "none")
    except (ValueError, AttributeError):
        return  # load_adapter reports the broken file
    if bias not in (None, "none"):
        raise UnsupportedModelError(
            f"{adapter_dir} trains biases (bias={bias!r}); loading it would change the shared base model for every "
            "request. Merge it into its own model (holdall merge) or retrain it with bias='none'"
        )
