"""OpenAI API shapes: request bodies (pydantic) and the JSON objects the server answers with.

Only the fields holdall implements carry meaning; parameters it does not implement (logprobs, penalties,
logit_bias, echo, best_of, suffix, tools) are refused with a 400 naming them when set to a non-default value,
rather than silently ignored. Unknown extra fields (``user``, vendor extensions) are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # accepted for compatibility, refused when set (see unsupported())
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """Names of parameters set to something holdall does not implement."""
        names = []
        if self.presence_penalty:
            names.append("presence_penalty")
        if self.frequency_penalty:
            names.append("frequency_penalty")
        if self.logit_bias:
            names.append("logit_bias")
        return names


class CompletionBody(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [n for n in ("echo", "logprobs", "suffix") if getattr(self, n)]
        if self.best_of not in (None, 1):
            names.append("best_of")
        return names


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [n for n in ("logprobs", "top_logprobs", "tools") if getattr(self, n)]
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            names.append("response_format")
        return names


class LoadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


# --- responses -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, root: str | None, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "holdall", "root": root,
            "parent": parent}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


Kind = Literal["completion", "chat"]
OBJECT = {"completion": "text_completion", "chat": "chat.completion"}
CHUNK_OBJECT = {"completion": "text_completion", "chat": "chat.completion.chunk"}
ID_PREFIX = {"completion": "cmpl", "chat": "chatcmpl"}


def envelope(kind: Kind, response_id: str, created: int, model: str, choices: list, chunk: bool,
             usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": (CHUNK_OBJECT if chunk else OBJECT)[kind],
                            "created": created, "model": model, "choices": choices}
    if usage_counts is not None or not chunk:
        body["usage"] = usage_counts
    return body


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "invalid_request_error", 409: "conflict_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
    error_type = kind.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
