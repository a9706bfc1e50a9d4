"""What the engine refuses, as exception types the HTTP layer maps onto status codes (see ``app.py``)."""

from __future__ import annotations

from holdall.errors import ConfigError, HoldallError


class ServingError(HoldallError):
    """Base class of the engine's refusals."""


class UnknownModelError(ServingError, LookupError):
    """A request or unload names a model / adapter the server does not have (HTTP 404)."""


class RequestTooLargeError(ConfigError):
    """A prompt or ``max_tokens`` above a configured limit; the message names the limit (HTTP 400)."""


class QueueFullError(ServingError):
    """Every queue slot is taken; the client should retry later (HTTP 429)."""


class EngineStoppedError(ServingError):
    """The engine is shutting down or was never started (HTTP 503)."""


class AdapterInUseError(ServingError):
    """An unload while requests for that adapter are queued or running (HTTP 409)."""


class GenerationFailedError(ServingError):
    """The forward pass failed for a batch (e.g. out of memory); every request in it gets this (HTTP 500)."""
