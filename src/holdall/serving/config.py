"""The typed settings of ``holdall serve``: the engine's limits and the HTTP server around it.

Both are frozen dataclasses validated in ``__post_init__`` (a bad value raises ``ConfigError`` before any
model loads); the CLI flags map onto their fields one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from holdall.errors import ConfigError


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the generation engine batches and what it refuses.

    max_batch_size: rows decoded together in one forward pass (running requests).
    max_prompt_tokens: longest prompt accepted (longer ones are refused with the limit named).
    max_new_tokens: most tokens one request may generate (``max_tokens`` above it is refused).
    max_queued_requests: requests waiting for a batch slot; one more is refused (HTTP 429) instead of queueing
        without bound.
    mixed_batches: rows of different adapters (and the base) share one forward pass. Off: one adapter at a
        time (what a server without per-row adapters has to do), kept to measure what mixing buys.
    continuous_batching: admit waiting requests between decode steps. Off: a batch runs until its last row
        finishes before the next one starts (batching per wave).
    default_max_tokens: completions' length when a request names none (OpenAI's default is 16), capped at
        max_new_tokens.
    """

    max_batch_size: int = 8
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_queued_requests: int = 256
    mixed_batches: bool = True
    continuous_batching: bool = True
    default_max_tokens: int = 16

    def __post_init__(self):
        for name in ("max_batch_size", "max_prompt_tokens", "max_new_tokens", "max_queued_requests",
                     "default_max_tokens"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP server: where it listens, who may call it, and the engine it drives.

    served_model_name: the ``model`` id of the base in the API (None: the model spec as given, e.g. "smollm2").
    api_key: when set, every ``/v1`` call needs ``Authorization: Bearer <api_key>`` (401 otherwise).
    max_body_bytes: request bodies above this are refused with 413 before they are parsed.
    max_choices: the most completions one HTTP request may ask for (prompts x ``n``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_choices: int = 16
    log_level: str = "info"
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535 (0: any free port), got {self.port!r}")
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("max_choices", self.max_choices)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; pass a non-empty key or leave it unset for no authentication")
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
