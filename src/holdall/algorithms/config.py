"""``QuantConfig`` (method + scheme + which layers), the method registry, and layer selection.

A method is registered with the scheme dtypes it can produce and its default scheme, so that
``QuantConfig(method="nf4")`` means "NF4 the way bitsandbytes does it" without spelling out the scheme.
A method may also declare a typed options class (``GPTQConfig``, ``HQQConfig``: subclasses of
:class:`MethodOptions`) and whether it needs calibration data (its default ``n_samples x seq_len``);
``QuantConfig`` then always holds resolved ``options`` / ``calibration`` for it, never a half-filled one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.scheme import QuantScheme
from ..errors import ConfigError
from .calibration import CalibrationConfig


@dataclass(frozen=True)
class MethodOptions:
    """Base class of a method's typed options (``GPTQConfig``, ``HQQConfig``): a frozen dataclass with a JSON
    round trip that refuses unknown keys (a typo must not silently fall back to a default)."""

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Raise ``ConfigError`` if these options cannot produce ``scheme`` (default: any scheme is fine)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodOptions":
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} must be built from a dict (JSON object), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


@dataclass
class MethodRun:
    """What a method gets besides the model and the config: run-time inputs that are not part of the recipe."""

    progress: bool = True
    calibration_ids: torch.Tensor | None = None  # token ids [n_samples, seq_len]; for calibrated methods only


@dataclass
class MethodResult:
    """A method's answer: the scheme of every layer it replaced, and optionally a JSON-ready run report."""

    schemes: dict[str, QuantScheme]
    report: dict[str, Any] | None = field(default=None)


#: ``fn(model, layer_names, config, run) -> {name: scheme} | MethodResult``: quantizes the named linears in place.
MethodFn = Callable[[nn.Module, list[str], "QuantConfig", MethodRun], "dict[str, QuantScheme] | MethodResult"]


@dataclass(frozen=True)
class Method:
    """A registered quantization method."""

    name: str
    fn: MethodFn
    dtypes: tuple[str, ...]  # scheme dtypes the method can produce
    default_scheme: QuantScheme
    help: str = ""
    options: type[MethodOptions] | None = None  # the typed options class; None = the method takes none
    calibration: tuple[int, int] | None = None  # default (n_samples, seq_len); None = calibration-free

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    fn: MethodFn,
    dtypes: Iterable[str],
    default_scheme: QuantScheme,
    help: str = "",
    *,
    options: type[MethodOptions] | None = None,
    calibration: tuple[int, int] | None = None,
    replace: bool = False,
) -> None:
    """Make ``QuantConfig(method=name)`` and ``quantize(...)`` use ``fn``.

    options: the method's typed options class (a :class:`MethodOptions` subclass), if it takes any.
    calibration: ``(n_samples, seq_len)`` defaults if the method needs calibration data, else None.
    """
    if name in _METHODS and not replace:
        raise ConfigError(f"a quantization method named {name!r} is already registered; pass replace=True")
    dtypes = tuple(dtypes)
    if default_scheme.dtype not in dtypes:
        raise ConfigError(f"method {name!r}: its default scheme {default_scheme.label} is not one of {dtypes}")
    if options is not None and not (isinstance(options, type) and issubclass(options, MethodOptions)):
        raise ConfigError(f"method {name!r}: options must be a MethodOptions subclass, got {options!r}")
    _METHODS[name] = Method(name, fn, dtypes, default_scheme, help, options, calibration)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown quantization method {name!r}; available: {', '.join(sorted(_METHODS)) or '(none)'}"
        ) from None


def method_names() -> list[str]:
    return sorted(_METHODS)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    method: a registered method (``"rtn"``, ``"nf4"``, ``"fp4"``, ``"gptq"``, ``"hqq"``; awq later).
    scheme: the storage scheme; None (the default) takes the method's default
        (rtn/gptq: int4 g128 sym fp16 scales; hqq: int4 g64 asym; nf4/fp4: bitsandbytes blocks of 64).
    targets: regexes searched (``re.search``) in module names; None = every ``nn.Linear`` except the
        output head (``get_output_embeddings()`` / any ``lm_head``). An explicit regex may select the head.
    exclude: regexes of module names never quantized.
    options: the method's typed options (``GPTQConfig`` for gptq, ``HQQConfig`` for hqq); None = its
        defaults. A method without options refuses any.
    calibration: where the calibration windows come from and how many (``CalibrationConfig``), for methods
        that need calibration data (gptq); None = its defaults (the shipped WikiText-2 valid split, GPTQ:
        128 x 2048 tokens). Calibration-free methods refuse one.
    """

    method: str = "rtn"
    scheme: QuantScheme | None = None
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    options: MethodOptions | None = None
    calibration: CalibrationConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ConfigError(f"QuantConfig.method must be a string, got {self.method!r}")
        spec = get_method(self.method)
        scheme = self.scheme
        if scheme is None:
            scheme = spec.default_scheme
        elif isinstance(scheme, dict):
            scheme = QuantScheme.from_dict(scheme)
        elif not isinstance(scheme, QuantScheme):
            raise ConfigError(f"QuantConfig.scheme must be a QuantScheme (or None), got {type(scheme).__name__}")
        if scheme.dtype not in spec.dtypes:
            raise ConfigError(
                f"method {self.method!r} produces {'/'.join(spec.dtypes)} weights, but the scheme is {scheme.label}; "
                f"use QuantConfig.for_method({self.method!r}, ...) or a scheme with dtype in {spec.dtypes}"
            )
        object.__setattr__(self, "scheme", scheme)
        targets = None if self.targets is None else _regexes("targets", self.targets)
        if targets == ():
            raise ConfigError("QuantConfig.targets=() selects no layer; use None for the default (every linear but the head)")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "exclude", _regexes("exclude", self.exclude))
        options = _resolve_options(spec, self.options)
        if options is not None:
            options.check_scheme(scheme)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "calibration", _resolve_calibration(spec, self.calibration))

    @classmethod
    def for_method(
        cls,
        method: str = "rtn",
        *,
        targets: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str = (),
        options: MethodOptions | dict[str, Any] | None = None,
        calibration: CalibrationConfig | dict[str, Any] | None = None,
        **scheme_fields: Any,
    ) -> "QuantConfig":
        """The method's default scheme with some fields changed: ``for_method("nf4", double_quant=True)``,
        ``for_method("gptq", bits=3, options=GPTQConfig(act_order=True))``."""
        spec = get_method(method)
        try:
            scheme = dataclasses.replace(spec.default_scheme, **scheme_fields)
        except TypeError as exc:
            fields = sorted(f.name for f in dataclasses.fields(QuantScheme))
            raise ConfigError(f"{exc}; QuantScheme fields are {fields}") from None
        return cls(
            method=method, scheme=scheme, targets=targets, exclude=exclude, options=options, calibration=calibration
        )

    @property
    def label(self) -> str:
        """``rtn:int4-g128-sym``, ``nf4:nf4-b64-dq``."""
        return f"{self.method}:{self.scheme.label}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "scheme": self.scheme.to_dict(),
            "targets": None if self.targets is None else list(self.targets),
            "exclude": list(self.exclude),
        }
        # only methods that have them write these keys, so rtn/nf4/fp4 records stay exactly as before
        if self.options is not None:
            data["options"] = self.options.to_dict()
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a quantization config must be a dict (JSON object), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s) {unknown}; valid fields are {sorted(known)}")
        data = dict(data)
        if data.get("scheme") is not None:
            data["scheme"] = QuantScheme.from_dict(data["scheme"])
        return cls(**data)


def _resolve_options(spec: Method, options: Any) -> MethodOptions | None:
    """The method's options object: the given one (or one built from a dict), its defaults, or None."""
    if spec.options is None:
        if options is not None:
            raise ConfigError(f"method {spec.name!r} takes no options, got {options!r}; drop options=")
        return None
    if options is None:
        return spec.options()
    if isinstance(options, dict):
        return spec.options.from_dict(options)
    if not isinstance(options, spec.options):
        raise ConfigError(
            f"method {spec.name!r} takes {spec.options.__name__} options, got {type(options).__name__}"
        )
    return options


def _resolve_calibration(spec: Method, calibration: Any) -> CalibrationConfig | None:
    """A fully filled ``CalibrationConfig`` for calibrated methods (None fields take the method's defaults)."""
    if spec.calibration is None:
        if calibration is not None:
            raise ConfigError(
                f"method {spec.name!r} needs no calibration data (it is calibration-free); drop calibration="
            )
        return None
    if calibration is None:
        calibration = CalibrationConfig()
    elif isinstance(calibration, dict):
        calibration = CalibrationConfig.from_dict(calibration)
    elif not isinstance(calibration, CalibrationConfig):
        raise ConfigError(f"QuantConfig.calibration must be a CalibrationConfig, got {type(calibration).__name__}")
    n_samples, seq_len = spec.calibration
    return calibration.with_defaults(n_samples, seq_len)


def _regexes(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ConfigError(f"QuantConfig.{field} must be a list of regex strings, got {value!r}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"QuantConfig.{field} must hold regex strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"QuantConfig.{field}: {pattern!r} is not a valid regex ({exc})") from None
    return patterns


# --- which layers ---------------------------------------------------------------------------------------
def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection: ``model.get_output_embeddings()`` plus anything called ``lm_head``."""
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):  # models without a head getter: the name rule alone applies
            head = None
    return {
        name
        for name, module in model.named_modules()
        if name and (module is head or name.rsplit(".", 1)[-1] == "lm_head")
    }


def select_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules ``config`` selects, in module order; ConfigError if none."""
    heads = output_head_names(model)
    linears = [name for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    chosen = []
    for name in linears:
        if config.targets is None:
            if name in heads:
                continue
        elif not any(re.search(p, name) for p in config.targets):
            continue
        if any(re.search(p, name) for p in config.exclude):
            continue
        chosen.append(name)
    if not chosen:
        sample = ", ".join(linears[:6]) + (" ..." if len(linears) > 6 else "")
        raise ConfigError(
            f"no layer matched: targets={list(config.targets) if config.targets else 'default'}, "
            f"exclude={list(config.exclude)}. The model's nn.Linear modules are: {sample or '(none)'}; "
            "adjust the regexes (they are matched with re.search against these names)"
        )
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
