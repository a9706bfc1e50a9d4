"""The OpenAI-compatible HTTP API over an :class:`~holdall.serving.engine.Engine` (FastAPI).

Routes: ``GET /v1/models`` (the base, then each adapter with ``parent`` = the base), ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``), ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's names and
bodies), ``GET /health`` and ``GET /stats``. The request's ``model`` picks the adapter (the base by its name).

Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 bad body or limit
exceeded (the message names the limit), 401 bad key, 404 unknown model or adapter, 409 adapter in use,
413 body too large, 429 queue full, 503 shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from holdall.errors import HoldallError, ModelNotFoundError
from holdall.serving import protocol
from holdall.serving.config import ServeConfig
from holdall.serving.engine import Engine, GenerationRequest, RequestHandle, StreamEvent
from holdall.serving.errors import (
    AdapterInUseError,
    EngineStoppedError,
    GenerationFailedError,
    QueueFullError,
    RequestTooLargeError,
    UnknownModelError,
)
from holdall.serving.sampling import SamplingParams

# the most specific class first: RequestTooLargeError is also a ConfigError (400 either way)
_STATUS = (
    (UnknownModelError, 404, "model_not_found"),
    (ModelNotFoundError, 404, "not_found"),
    (RequestTooLargeError, 400, "request_too_large"),
    (AdapterInUseError, 409, "adapter_in_use"),
    (QueueFullError, 429, "queue_full"),
    (EngineStoppedError, 503, "shutting_down"),
    (GenerationFailedError, 500, "generation_failed"),
)


class APIError(Exception):
    """An HTTP-level refusal raised by a route (bad parameter, unsupported feature)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _status_of(exc: HoldallError) -> tuple[int, str | None]:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code
    return 400, None  # ConfigError, UnsupportedModelError, CorruptFileError: the request asked for something bad


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, status, param, code), status_code=status)


@dataclass
class _Choice:
    """One completion an HTTP request asked for (prompt x n)."""

    index: int
    request: GenerationRequest


def create_app(engine: Engine, config: ServeConfig, base_name: str, base_root: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine's scheduler and stops it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="holdall serve", lifespan=lifespan)
    created = protocol.now()
    _install_error_handlers(app)
    _install_body_limit(app, config.max_body_bytes)
    api = APIRouter(dependencies=[Depends(_auth_dependency(config.api_key))])

    def adapter_for(model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base); 404 for anything else."""
        if model == base_name:
            return None
        if model in engine.adapters:
            return model
        raise UnknownModelError(
            f"the model {model!r} does not exist on this server; it serves {[base_name, *engine.adapters]} "
            "(load an adapter with POST /v1/load_lora_adapter)"
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok" if engine.running else "stopped"}

    @api.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**engine.stats.to_dict(), "adapters": engine.adapters,
                "in_use": {name: engine.in_use(name) for name in engine.adapters}}

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [protocol.model_card(base_name, created, base_root, None)]
        cards += [protocol.model_card(name, created, None, base_name) for name in engine.adapters]
        return {"object": "list", "data": cards}

    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        adapter = adapter_for(model_id)
        return protocol.model_card(model_id, created, base_root if adapter is None else None,
                                   None if adapter is None else base_name)

    @api.post("/v1/completions")
    async def completions(body: protocol.CompletionBody):
        adapter = adapter_for(body.model)
        _refuse_unsupported(body)
        prompts = _completion_prompts(engine.tokenizer, body.prompt)
        max_tokens = body.max_tokens or min(engine.config.default_max_tokens, engine.config.max_new_tokens)
        choices = _choices(prompts, body, max_tokens, adapter, config.max_choices)
        return await _respond("completion", engine, body, choices, prompts)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatBody):
        adapter = adapter_for(body.model)
        _refuse_unsupported(body)
        prompt = _chat_prompt(engine.tokenizer, body.messages, base_name)
        max_tokens = body.max_completion_tokens or body.max_tokens or _room_left(engine, len(prompt))
        choices = _choices([prompt], body, max_tokens, adapter, config.max_choices)
        return await _respond("chat", engine, body, choices, [prompt])

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: protocol.LoadAdapterBody) -> dict[str, str]:
        if body.lora_name == base_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name; give the adapter another name",
                           "lora_name")
        await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded", "lora_name": body.lora_name}

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: protocol.UnloadAdapterBody) -> dict[str, str]:
        await run_in_threadpool(engine.unload_adapter, body.lora_name)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded", "lora_name": body.lora_name}

    app.include_router(api)
    return app


# --- request -> engine requests ------------------------------------------------------------------------
def _refuse_unsupported(body: protocol._GenerationBody) -> None:
    names = body.unsupported()
    if names:
        raise APIError(400, f"holdall serve does not implement {', '.join(names)}; leave them unset", names[0],
                       "unsupported_parameter")


def _completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list; send a string or token ids", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], list):
        return [list(p) for p in prompt]
    # a BOS token in front, as the model saw in training (tokenizers without one add nothing)
    return [tokenizer(text)["input_ids"] for text in prompt]


def _chat_prompt(tokenizer, messages: list[protocol.ChatMessage], base_name: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the tokenizer of {base_name} has no chat template, so chat requests cannot be "
                            "formatted; use /v1/completions with your own prompt format", "messages")
    rendered = [{"role": m.role, "content": _message_text(m)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # templates raise for conversations they do not support (e.g. a system role)
        raise APIError(400, f"the chat template of {base_name} refused these messages: {exc}", "messages") from exc
    # the template already wrote any BOS token; adding special tokens again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _message_text(message: protocol.ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"message content of type {part.type!r} is not supported; send text parts",
                           "messages")
        parts.append(part.text)
    return "".join(parts)


def _room_left(engine: Engine, prompt_tokens: int) -> int:
    """Chat's default length: as much as the limits and the context allow (at least 1)."""
    room = engine.config.max_new_tokens
    if engine.max_context is not None:
        room = min(room, engine.max_context - prompt_tokens)
    return max(room, 1)


def _choices(prompts: list[list[int]], body: protocol._GenerationBody, max_tokens: int, adapter: str | None,
             max_choices: int) -> list[_Choice]:
    n = body.n or 1
    if len(prompts) * n > max_choices:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} asks for {len(prompts) * n} completions; this server "
                            f"returns at most {max_choices} per request (--max-choices)", "n")
    choices = []
    for prompt in prompts:
        for j in range(n):
            # n > 1 with a seed: each choice gets its own stream (seed + j), or all n would be identical
            seed = None if body.seed is None else body.seed + j
            params = _sampling(body, max_tokens, seed)
            choices.append(_Choice(len(choices), GenerationRequest(tuple(prompt), params, adapter)))
    return choices


def _sampling(body: protocol._GenerationBody, max_tokens: int, seed: int | None) -> SamplingParams:
    stop = body.stop if body.stop is not None else ()
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=seed,
    )


# --- running and answering -------------------------------------------------------------------------------
def _submit_all(engine: Engine, choices: list[_Choice]) -> tuple[asyncio.Queue, list[RequestHandle]]:
    """Submit every choice; events arrive on one asyncio queue as ``(choice index, StreamEvent)``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for choice in choices:
        engine.check(choice.request)  # refuse the whole request before any part of it is queued
    handles: list[RequestHandle] = []
    try:
        for choice in choices:
            def sink(event: StreamEvent, index: int = choice.index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            handles.append(engine.submit(choice.request, sink))
    except HoldallError:
        for handle in handles:
            handle.cancel()
        raise
    return events, handles


async def _respond(kind: protocol.Kind, engine: Engine, body: protocol._GenerationBody, choices: list[_Choice],
                   prompts: list[list[int]]):
    events, handles = _submit_all(engine, choices)
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(kind, body.model, events, handles, len(choices), prompt_tokens, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        finals = await _collect(events, len(choices))
    finally:
        for handle in handles:  # no-op for finished requests; stops the rest if this handler was cancelled
            handle.cancel()
    make = protocol.completion_choice if kind == "completion" else protocol.chat_choice
    out = [make(i, text, event.finish_reason) for i, (text, event) in sorted(finals.items())]
    completion_tokens = sum(event.completion_tokens for _, event in finals.values())
    return protocol.envelope(kind, protocol.new_id(protocol.ID_PREFIX[kind]), protocol.now(), body.model, out,
                             chunk=False, usage_counts=protocol.usage(prompt_tokens, completion_tokens))


async def _collect(events: asyncio.Queue, n: int) -> dict[int, tuple[str, StreamEvent]]:
    """Wait for every choice's final event; the first failure is raised (and mapped to its status)."""
    texts: dict[int, list[str]] = {}
    finals: dict[int, tuple[str, StreamEvent]] = {}
    while len(finals) < n:
        index, event = await events.get()
        if event.error is not None:
            raise event.error
        texts.setdefault(index, []).append(event.delta)
        if event.final:
            finals[index] = ("".join(texts[index]), event)
    return finals


async def _sse(kind: protocol.Kind, model: str, events: asyncio.Queue, handles: list[RequestHandle], n: int,
               prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a chunk with each choice's finish_reason, then [DONE]."""
    response_id, created = protocol.new_id(protocol.ID_PREFIX[kind]), protocol.now()

    def chunk(choices: list, usage_counts: dict | None = None) -> str:
        body = protocol.envelope(kind, response_id, created, model, choices, chunk=True, usage_counts=usage_counts)
        return f"data: {json.dumps(body)}\n\n"

    def piece(index: int, text: str | None, finish_reason: str | None) -> dict:
        if kind == "completion":
            return protocol.completion_choice(index, text or "", finish_reason)
        return protocol.chat_delta(index, {} if text is None else {"content": text}, finish_reason)

    completion_tokens, done = 0, 0
    try:
        if kind == "chat":  # OpenAI opens every chat choice with a role-only delta
            for index in range(n):
                yield chunk([protocol.chat_delta(index, {"role": "assistant", "content": ""}, None)])
        while done < n:
            index, event = await events.get()
            if event.error is not None:
                status, code = _status_of(event.error) if isinstance(event.error, HoldallError) else (500, None)
                yield f"data: {json.dumps(protocol.error_body(str(event.error), status, code=code))}\n\n"
                break
            if event.delta:
                yield chunk([piece(index, event.delta, None)])
            if event.final:
                done += 1
                completion_tokens += event.completion_tokens
                yield chunk([piece(index, None, event.finish_reason)])
        if include_usage and done == n:
            yield chunk([], protocol.usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop generating for it
        for handle in handles:
            handle.cancel()


# --- cross-cutting: auth, errors, body size ------------------------------------------------------------------
def _auth_dependency(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' with the key "
                                "the server was started with (--api-key)", code="invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HoldallError)
    async def holdall_error(_request: Request, exc: HoldallError):
        status, code = _status_of(exc)
        return _error_response(status, str(exc), code=code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                    for e in exc.errors()]
        first = exc.errors()[0]["loc"][-1] if exc.errors() else None
        return _error_response(400, "invalid request body: " + "; ".join(problems), str(first), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail))


class _BodyLimit:
    """Refuse bodies whose Content-Length exceeds the limit (413) before anything reads them.

    A plain ASGI middleware rather than ``@app.middleware("http")``: that wrapper runs the route in a task of
    its own and re-streams the response, which gets in the way of the SSE stream noticing a client disconnect.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = _error_response(413, f"the request body has {int(length)} bytes; this server accepts at "
                                                f"most {self.limit} (--max-body-bytes)", code="request_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_body_limit(app: FastAPI, limit: int) -> None:
    app.add_middleware(_BodyLimit, limit=limit)
