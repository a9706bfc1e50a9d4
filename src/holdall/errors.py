"""The errors holdall raises on bad input.

Every message names the cause and the fix; the CLI prints ``error: <message>`` and exits with status 2
for a :class:`HoldallError`, so users never see a traceback for a mistake of theirs.
"""

from __future__ import annotations


class HoldallError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ModelNotFoundError(HoldallError, FileNotFoundError):
    """A model path or hub id that does not resolve to anything loadable."""


class UnsupportedModelError(HoldallError):
    """An architecture or layer type holdall does not handle (yet)."""


class CorruptFileError(HoldallError):
    """A file that exists but cannot be parsed: truncated, wrong format, bad header."""


class ConfigError(HoldallError, ValueError):
    """An invalid combination of options (bits, group size, method...)."""


class DataError(HoldallError, ValueError):
    """Bad input data: empty text, NaNs in calibration, too few tokens for one window."""


class MissingDependencyError(HoldallError, ImportError):
    """An optional dependency is needed for this path; the message names the pip command."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'holdall[{extra}]'"
        ) from exc
