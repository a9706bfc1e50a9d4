"""The typed description of one pipeline run, read from a TOML file (or built in Python / from CLI flags).

```toml
base = "smollm2"                      # what load_model accepts: hub id, HF directory, .gguf, alias

[finetune]                            # holdall.training.FinetuneConfig fields
method = "qlora"
max_steps = 40

[[customers]]
name = "medical"
data = "client_a_medical.jsonl"       # relative paths are relative to this file

[[targets]]
kind = "gguf"                         # a llama.cpp file per customer
type = "Q4_K_M"

[[targets]]
kind = "quantize"                     # a holdall-quantized directory per customer
method = "rtn"
bits = 4
group_size = 64

[[targets]]
kind = "adapters"                     # one quantized base + every adapter, unmerged, for `holdall serve`
base = "nf4"

[eval]
seq_len = 512
max_windows = 8
```
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from ..training import FinetuneConfig

TargetKind = Literal["gguf", "quantize", "adapters"]
SERVED_BASES = ("float", "nf4", "int4")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    return name


@dataclass(frozen=True)
class CustomerSpec:
    """One customer: a name (a directory name and the served adapter's model id) and a training data file."""

    name: str
    data: Path
    description: str = ""

    def __post_init__(self):
        _check_name("customer", self.name)
        object.__setattr__(self, "data", Path(self.data))


@dataclass(frozen=True)
class TargetSpec:
    """One deployment target.

    kind: ``gguf`` (a GGUF file of ``type`` per customer, optionally with an importance matrix measured on
        ``calibrate`` text), ``quantize`` (a quantized checkpoint per customer: ``method`` rtn / nf4 / hqq / gptq /
        awq with ``bits`` / ``group_size`` / ``symmetric``, calibrated methods reading ``calibrate``; written as
        ``format`` holdall (any scheme) or gptq / awq / compressed-tensors, which transformers and vLLM load),
        or ``adapters`` (one base stored as ``base`` = float / nf4 / int4 plus every customer's adapter,
        unmerged, for multi-adapter serving).
    calibrate: ``"wikitext2"`` (the shipped WikiText-2 valid split) or a text file path.
    """

    kind: TargetKind
    name: str = ""
    type: str | None = None
    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    calibrate: str | None = None
    format: str | None = None
    base: str = "nf4"

    def __post_init__(self):
        if self.kind == "gguf":
            from ..formats.gguf.filetypes import get_file_type

            if not self.type:
                raise ConfigError("a gguf target needs type = \"Q4_K_M\" (or another llama.cpp file type)")
            object.__setattr__(self, "type", get_file_type(self.type).name)
            self._refuse("method", "bits", "group_size", "symmetric", "format")
        elif self.kind == "quantize":
            from ..algorithms.config import get_method

            if not self.method:
                raise ConfigError("a quantize target needs method = \"rtn\" (or nf4, hqq, gptq, ...)")
            spec = get_method(self.method)
            self._refuse("type")
            if self.calibrate and not spec.needs_calibration:
                raise ConfigError(f"method {self.method!r} is calibration-free; drop calibrate from its target")
            from ..formats import FORMATS

            object.__setattr__(self, "format", self.format or "holdall")
            if self.format not in FORMATS:
                raise ConfigError(f"unknown checkpoint format {self.format!r}; choose one of {', '.join(FORMATS)}")
            self.quant_config()  # validates bits / group size now, not after an hour of fine-tuning
        elif self.kind == "adapters":
            if self.base not in SERVED_BASES:
                raise ConfigError(f"an adapters target's base must be one of {', '.join(SERVED_BASES)}, got {self.base!r}")
            self._refuse("type", "method", "bits", "group_size", "symmetric", "calibrate", "format")
        else:
            raise ConfigError(f"unknown target kind {self.kind!r}; use gguf, quantize or adapters")
        object.__setattr__(self, "name", _check_name("target", self.name or self.default_name()))

    def _refuse(self, *fields: str) -> None:
        given = [f for f in fields if getattr(self, f) is not None]
        if given:
            raise ConfigError(f"a {self.kind} target does not take {', '.join(given)}")

    def default_name(self) -> str:
        if self.kind == "gguf":
            return f"gguf-{self.type.lower()}" + ("-imatrix" if self.calibrate else "")
        if self.kind == "adapters":
            return f"adapters-{self.base}"
        scheme = self.quant_config().scheme
        label = f"{self.method}-w{scheme.bits}" + (f"g{scheme.group_size}" if scheme.granularity == "group" else "")
        return label + ("" if self.format == "holdall" else f"-{self.format}")

    @property
    def per_customer(self) -> bool:
        return self.kind != "adapters"

    def quant_config(self):
        """The QuantConfig of a ``quantize`` target (or of the served base of an ``adapters`` target)."""
        from ..algorithms import QuantConfig
        from ..algorithms.calibration import CalibrationConfig

        if self.kind == "adapters":
            if self.base == "nf4":
                return QuantConfig.for_method("nf4", double_quant=True)
            return QuantConfig.for_method("rtn", bits=4, group_size=64)
        fields = {k: v for k, v in (("bits", self.bits), ("group_size", self.group_size),
                                    ("symmetric", self.symmetric)) if v is not None}
        calibration = None
        if self.calibrate:
            calibration = CalibrationConfig(text=_calibration_path(self.calibrate))
        return QuantConfig.for_method(self.method, calibration=calibration, **fields)

    def calibration_text_path(self) -> Path | None:
        return _calibration_path(self.calibrate) if self.calibrate else None

    def describe(self) -> str:
        if self.kind == "gguf":
            return f"GGUF {self.type}" + (" with an importance matrix" if self.calibrate else "")
        if self.kind == "adapters":
            return f"{self.base} base + unmerged adapters"
        where = "holdall" if self.format == "holdall" else f"{self.format} checkpoint"
        return f"{where} {self.quant_config().scheme.label} ({self.method})"


def _calibration_path(value: str) -> Path:
    if value == "wikitext2":
        from ..data import wikitext2

        return wikitext2("valid")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"calibration text {value} does not exist; pass a text file or \"wikitext2\"")
    return path


@dataclass(frozen=True)
class EvalSpec:
    """How every artifact is scored.

    text: general text for perplexity and KL divergence (``"wikitext2"`` = the shipped test split, or a path).
    seq_len / max_windows: non-overlapping windows of that text (``max_windows`` of them).
    engine: ``auto`` scores GGUF files with llama.cpp when llama-cpp-python is installed (what users will
        run), else ``torch`` (transformers dequantizes the file).
    """

    text: str = "wikitext2"
    seq_len: int = 512
    max_windows: int = 8
    engine: Literal["auto", "llamacpp", "torch"] = "auto"

    def __post_init__(self):
        if self.engine not in ("auto", "llamacpp", "torch"):
            raise ConfigError(f"eval.engine must be auto, llamacpp or torch, got {self.engine!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ConfigError(f"eval.seq_len must be an integer >= 8, got {self.seq_len!r}")
        if not isinstance(self.max_windows, int) or self.max_windows < 1:
            raise ConfigError(f"eval.max_windows must be a positive integer, got {self.max_windows!r}")

    def text_path(self) -> Path:
        if self.text == "wikitext2":
            from ..data import wikitext2

            return wikitext2("test")
        path = Path(self.text)
        if not path.is_file():
            raise ConfigError(f"eval text {self.text} does not exist; pass a text file or \"wikitext2\"")
        return path


@dataclass(frozen=True)
class PipelineConfig:
    """A whole run: base model, customers, how to fine-tune, what to deploy, how to evaluate.

    merged_dtype: the dtype merged models are saved in (float32: merging rounds nothing; bfloat16/float16 halve
        the disk they take, at one rounding).
    force: allow a base that is already holdall-quantized (refused by default: merging into it and quantizing it
        again rounds twice).
    """

    base: str
    customers: tuple[CustomerSpec, ...]
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    targets: tuple[TargetSpec, ...] = ()
    eval: EvalSpec = field(default_factory=EvalSpec)
    merged_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    force: bool = False

    def __post_init__(self):
        if not self.base or not isinstance(self.base, str):
            raise ConfigError("the pipeline needs base = \"MODEL\" (a hub id, HF directory, .gguf file or alias)")
        customers = tuple(self.customers)
        if not customers:
            raise ConfigError("the pipeline needs at least one [[customers]] entry (name + data file)")
        _unique("customer", [c.name for c in customers])
        targets = tuple(self.targets)
        _unique("target", [t.name for t in targets])
        if "merged" in {t.name for t in targets}:
            raise ConfigError("'merged' is the name of the float merged model; give the target another name")
        if self.merged_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"merged_dtype must be float32, bfloat16 or float16, got {self.merged_dtype!r}")
        if self.finetune.eval_fraction <= 0:
            raise ConfigError(
                "finetune.eval_fraction must be > 0: the pipeline measures every artifact on each customer's "
                "held-out records (0.1 is a good value)"
            )
        object.__setattr__(self, "customers", customers)
        object.__setattr__(self, "targets", targets)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["customers"] = [{**dataclasses.asdict(c), "data": str(c.data)} for c in self.customers]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], relative_to: Path | None = None) -> "PipelineConfig":
        """Build from a parsed TOML/JSON mapping; relative data/calibration/text paths resolve against
        ``relative_to`` (the config file's folder)."""
        data = dict(data)
        _known("pipeline config", data, {f.name for f in dataclasses.fields(cls)})
        root = relative_to or Path.cwd()
        customers = [
            CustomerSpec(**_known("[[customers]]", dict(c), {"name", "data", "description"},
                                  paths=("data",), root=root))
            for c in _list_of_tables("customers", data.pop("customers", []))
        ]
        targets = [
            TargetSpec(**_known("[[targets]]", dict(t), {f.name for f in dataclasses.fields(TargetSpec)},
                                paths=("calibrate",), root=root))
            for t in _list_of_tables("targets", data.pop("targets", []))
        ]
        finetune = _finetune_config(data.pop("finetune", {}))
        eval_spec = EvalSpec(**_known("[eval]", dict(data.pop("eval", {})), {f.name for f in dataclasses.fields(EvalSpec)},
                                      paths=("text",), root=root))
        base = data.pop("base", None)
        if isinstance(base, str) and not _is_alias_or_hub(base, root):
            base = str((root / base).resolve())
        return cls(base=base, customers=tuple(customers), finetune=finetune, targets=tuple(targets),
                   eval=eval_spec, **data)


def _finetune_config(data: Any) -> FinetuneConfig:
    if isinstance(data, FinetuneConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError("[finetune] must be a table of holdall.training.FinetuneConfig fields")
    _known("[finetune]", dict(data), {f.name for f in dataclasses.fields(FinetuneConfig)})
    if isinstance(data.get("targets"), list):
        data = {**data, "targets": tuple(data["targets"])}
    return FinetuneConfig(**data)


def _is_alias_or_hub(spec: str, root: Path) -> bool:
    """A base that is not a path under the config's folder stays as written (alias, hub id, absolute path)."""
    return Path(spec).is_absolute() or not (root / spec).exists()


def _list_of_tables(what: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{what} must be an array of tables ([[{what}]] in TOML)")
    return value


def _known(what: str, data: dict, known: set[str], paths: tuple[str, ...] = (), root: Path | None = None) -> dict:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    for key in paths:
        value = data.get(key)
        if isinstance(value, str) and value != "wikitext2" and root is not None and not Path(value).is_absolute():
            data[key] = str((root / value).resolve())
    return data


def _unique(what: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"two {what}s are named {name!r}; names must be unique")
        seen.add(name)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline TOML file (JSON works too: the same fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config {path} does not exist; see docs or `holdall pipeline --demo`")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            import json

            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from None
    return PipelineConfig.from_dict(data, relative_to=path.resolve().parent)


def parse_target(spec: str) -> TargetSpec:
    """CLI shorthand: ``gguf:Q4_K_M``, ``gguf:Q4_K_M:imatrix``, ``rtn:w4g128``, ``gptq:w4g64``,
    ``awq:w4g128:awq`` (a third part names the checkpoint format), ``nf4``, ``adapters:nf4``."""
    parts = spec.split(":")
    head = parts[0].lower()
    if head == "gguf":
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "imatrix"):
            raise ConfigError(f"--target {spec!r}: write gguf:TYPE or gguf:TYPE:imatrix (e.g. gguf:Q4_K_M)")
        return TargetSpec(kind="gguf", type=parts[1], calibrate="wikitext2" if len(parts) == 3 else None)
    if head == "adapters":
        return TargetSpec(kind="adapters", base=parts[1] if len(parts) > 1 else "nf4")
    fields: dict[str, Any] = {}
    if len(parts) > 3:
        raise ConfigError(f"--target {spec!r}: write METHOD, METHOD:wBITSgGROUP or METHOD:wBITSgGROUP:FORMAT "
                          "(e.g. rtn:w4g128, gptq:w4g64:gptq)")
    if len(parts) == 3:
        fields["format"] = parts[2]
    if len(parts) >= 2:
        match = re.fullmatch(r"w(\d)(?:g(\d+))?", parts[1])
        if not match:
            raise ConfigError(f"--target {spec!r}: {parts[1]!r} is not wBITS or wBITSgGROUP (e.g. w4g128)")
        fields["bits"] = int(match.group(1))
        if match.group(2):
            fields["group_size"] = int(match.group(2))
    from ..algorithms.config import get_method

    if get_method(head).needs_calibration:
        fields["calibrate"] = "wikitext2"
    return TargetSpec(kind="quantize", method=head, **fields)


def demo_config_path() -> Path:
    """The shipped three-customer scenario (``holdall pipeline --demo``)."""
    from ..data import DATA_DIR

    return DATA_DIR / "customers" / "pipeline.toml"
