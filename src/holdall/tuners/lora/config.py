"""``LoraConfig``: the typed, frozen description of one LoRA adapter (what to wrap, rank, scaling, dropout)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from holdall.errors import ConfigError

ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"
BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's hyper-parameters.

    r: the rank of the update ``B @ A`` (``A [r, in]``, ``B [out, r]``).
    alpha: scaling numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    dropout: dropout probability on the adapter's input (training only; the base path never sees it).
    targets: ``"all-linear"`` (every linear except the output head), a tuple of module-name suffixes
        (``("q_proj", "v_proj")`` matches ``model.layers.3.self_attn.q_proj``), or ``"re:<regex>"`` matched
        against the full module name with ``re.fullmatch``.
    bias: which biases train: ``"none"``, ``"all"`` (every bias of the model) or ``"lora_only"`` (the biases
        of the wrapped linears).
    use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023), better for large ranks.
    modules_to_save: module-name suffixes trained in full (a private copy per adapter; e.g. ``("lm_head",)``).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: str | tuple[str, ...] = ALL_LINEAR
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        # Lists are accepted for convenience (JSON, CLI) and stored as tuples so the config stays hashable.
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.modules_to_save, (list, str)):
            value = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(value))
        _check_rank(self.r)
        _check_alpha(self.alpha)
        _check_dropout(self.dropout)
        _check_targets(self.targets)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoraConfig bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig use_rslora must be True or False, got {self.use_rslora!r}")
        for name in self.modules_to_save:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"LoraConfig modules_to_save holds module-name suffixes, got {name!r}")

    @property
    def scaling(self) -> float:
        """The factor applied to ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return scaling_for(self.alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        out["modules_to_save"] = list(self.modules_to_save)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown LoraConfig fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def scaling_for(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_rank(r: Any) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoraConfig r (the rank) must be a positive integer such as 8 or 16, got {r!r}")


def _check_alpha(alpha: Any) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"LoraConfig alpha must be a positive number (commonly 2*r), got {alpha!r}")


def _check_dropout(p: Any) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ConfigError(f"LoraConfig dropout must be a probability in [0, 1), got {p!r}")


def _check_targets(targets: Any) -> None:
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return
        if targets.startswith(REGEX_PREFIX):
            try:
                re.compile(targets[len(REGEX_PREFIX):])
            except re.error as exc:
                raise ConfigError(f"LoraConfig targets {targets!r} is not a valid regular expression: {exc}") from exc
            return
        raise ConfigError(
            f"LoraConfig targets {targets!r} is ambiguous: use 'all-linear', a tuple of module names such as "
            f"({targets!r},), or 're:<regex>' for a regular expression over full module names"
        )
    if not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            "LoraConfig targets must be 'all-linear', 're:<regex>' or a non-empty tuple of module names "
            f"such as ('q_proj', 'v_proj'); got {targets!r}"
        )
