"""The memory planner: what inference, full fine-tuning, LoRA and QLoRA need for a model, before loading it.

Everything is computed from the architecture alone (a preset, a ``config.json``, a ``.gguf`` header or a hub
config), never from weights. Each budget line carries the formula that produced it, so a reader can check the
arithmetic by hand; ``format_plan`` prints it and ``MemoryPlan.to_dict`` serialises it for ``--json``.

Accounting conventions (stated again in ``MemoryPlan.notes``):

* Parameters are counted exactly for the Llama family (Llama, Mistral, Qwen2): embeddings, LM head (0 when
  tied to the embeddings), the seven decoder linears per layer (GQA shrinks k/v), their biases, RMSNorm
  weights. Tests check the counts against transformers models instantiated on the meta device.
* Quantized modes quantize only the decoder linears; embeddings, LM head, norms and biases stay 16-bit, as
  bitsandbytes, GPTQ and AWQ do — that is why a "7B" model in NF4 is ~3.9 GB and not 3.5 GB.
* Activations assume bf16, SDPA/flash attention (no seq x seq score matrix is stored), no dropout, and
  count the tensors autograd keeps per decoder layer explicitly (see ``_activation_elems_per_token``).
  Small per-token statistics (RMSNorm rstd, softmax log-sum-exp), the CUDA context, allocator fragmentation
  and temporary workspaces are not counted: keep ~1-2 GB of headroom on a real GPU.
* Sizes are bytes; the text shows decimal GB (1e9 bytes, the unit of GPU marketing and of the seed) and GiB.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from holdall.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from holdall.planning.presets import get_preset, preset_names

GB = 1_000_000_000
GIB = 1 << 30

# The seven decoder linears of a Llama-family layer, in module order; peft's "all-linear" targets all of
# them (it never includes lm_head).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The seed's worked example: a 7B model with ~20M trainable adapter parameters (0.04 GB of fp16 gradients).
SEED_PARAMS = 7e9
SEED_TRAINABLE = 20e6


# ----------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """The shape of a Llama-family decoder: all the planner needs."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_position: int | None = None
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    nominal_params: float | None = None  # the size in the model's name (7e9 for "7B"); textbook view only

    def __post_init__(self):
        for key in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"architecture field {key} must be a positive integer, got {value!r}.")
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.heads}) must be a multiple of num_key_value_heads "
                f"({self.kv_heads}) for grouped-query attention; check the config."
            )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """``(name, in_features, out_features)`` of the decoder linears of one layer."""
        h, i = self.hidden, self.intermediate
        return [
            ("q_proj", h, self.q_dim),
            ("k_proj", h, self.kv_dim),
            ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def arch_from_config(config, name: str | None = None) -> ArchSpec:
    """Build an ``ArchSpec`` from a ``config.json`` dict or a transformers ``PretrainedConfig``."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "_name_or_path": cfg.get("_name_or_path")}  # multimodal wrapper
    model_type = cfg.get("model_type") or "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported by the memory planner (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}). Plan with the closest preset instead: {', '.join(preset_names())}."
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if cfg.get(key) is None]
    if missing:
        raise ConfigError(
            f"the config lacks {', '.join(missing)}; pass a complete Llama-family config.json or a preset "
            f"({', '.join(preset_names())})."
        )
    heads = cfg["num_attention_heads"]
    attention_bias = bool(cfg.get("attention_bias", False))
    return ArchSpec(
        name=name or cfg.get("name") or cfg.get("_name_or_path") or model_type,
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"],
        # LlamaConfig, MistralConfig and Qwen2Config all default to untied embeddings.
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=cfg.get("max_position_embeddings"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        model_type=model_type,
        nominal_params=cfg.get("nominal_params"),
    )


def load_arch(spec) -> ArchSpec:
    """Resolve ``spec``: an ``ArchSpec``, a config dict, a preset name, a ``config.json`` (or a directory
    holding one), a ``.gguf`` file (header only), or a hub id (config only, through transformers)."""
    if isinstance(spec, ArchSpec):
        return spec
    if isinstance(spec, dict) or hasattr(spec, "to_dict"):
        return arch_from_config(spec)
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"cannot plan for a {type(spec).__name__}; pass a preset name, a path or a hub id.")
    text = str(spec)
    preset = get_preset(text)
    if preset is not None:
        return arch_from_config(preset, name=preset["name"])
    path = Path(text).expanduser()
    if path.exists():
        return _arch_from_path(path)
    if _looks_like_path(text):
        raise ModelNotFoundError(
            f"no such file or directory: {text}. Pass an existing config.json, a model directory, a .gguf "
            f"file, or a preset ({', '.join(preset_names())})."
        )
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        return _arch_from_hub(text)
    raise ModelNotFoundError(
        f"'{text}' is not a preset, a path or a hub id. Presets: {', '.join(preset_names())}; or pass a "
        f"config.json, a model directory, a .gguf file, or a hub id such as meta-llama/Llama-2-7b-hf."
    )


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith((".json", ".gguf")) or "\\" in text


def _arch_from_path(path: Path) -> ArchSpec:
    if path.is_dir():
        if (path / "config.json").is_file():
            return _arch_from_json(path / "config.json", name=path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _arch_from_gguf(ggufs[0])
        raise ModelNotFoundError(
            f"{path} holds no config.json"
            + (f" and {len(ggufs)} .gguf files; pass one of them." if ggufs else "; pass a model directory.")
        )
    if path.suffix == ".gguf":
        return _arch_from_gguf(path)
    return _arch_from_json(path, name=path.parent.name or path.stem)


def _arch_from_json(path: Path, name: str) -> ArchSpec:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); pass a model's config.json.") from exc
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object; pass a model's config.json.")
    return arch_from_config(cfg, name=cfg.get("_name_or_path") or name)


def _arch_from_hub(repo_id: str) -> ArchSpec:
    from holdall.errors import require

    transformers = require("transformers", "hf", "Planning from a hub id")
    try:
        config = transformers.AutoConfig.from_pretrained(repo_id)
    except Exception as exc:  # offline, gated, misspelled: all end the same way for the user
        raise ModelNotFoundError(
            f"could not fetch the config of '{repo_id}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            f"If you are offline or the repo is gated, use a preset ({', '.join(preset_names())}) or a local "
            f"config.json."
        ) from exc
    return arch_from_config(config, name=repo_id)


def _arch_from_gguf(path: Path) -> ArchSpec:
    from holdall.errors import require

    gguf = require("gguf", "hf", "Reading a .gguf header")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CorruptFileError(f"{path} is not a readable GGUF file ({exc}); check the download.") from exc

    def value(key, default=None):
        fld = reader.fields.get(key)
        return default if fld is None else fld.contents()

    arch = value("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path.name} is a '{arch}' GGUF; the planner supports {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None and "token_embd.weight" in tensor_names:
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(embd.shape[-1])  # GGUF shapes are innermost-first: [hidden, vocab]
    cfg = {
        "model_type": arch,
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "vocab_size": vocab,
        "max_position_embeddings": value(f"{arch}.context_length"),
        # llama.cpp writes no output.weight when the LM head is tied to the embeddings.
        "tie_word_embeddings": bool(tensor_names) and "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
    }
    cfg = {k: (int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in cfg.items()}
    return arch_from_config(cfg, name=value("general.name") or path.stem)


# ----------------------------------------------------------------------------------------------------------
# Parameter counting
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    decoder_linears: int  # weights of the 7 linears x layers
    biases: int
    norms: int  # 2 RMSNorm weights per layer + the final norm

    @property
    def total(self) -> int:
        return self.embeddings + self.lm_head + self.decoder_linears + self.biases + self.norms

    @property
    def non_linear(self) -> int:
        """Everything that quantized modes keep at 16 bits."""
        return self.total - self.decoder_linears

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def count_params(arch: ArchSpec) -> ParamCounts:
    """Exact parameter counts of a Llama-family model (what ``sum(p.numel())`` gives in transformers)."""
    per_layer_linears = sum(i * o for _, i, o in arch.linear_shapes())
    per_layer_biases = (
        (arch.q_dim + 2 * arch.kv_dim if arch.qkv_bias else 0)
        + (arch.hidden if arch.o_bias else 0)
        + (2 * arch.intermediate + arch.hidden if arch.mlp_bias else 0)
    )
    embeddings = arch.vocab * arch.hidden
    return ParamCounts(
        embeddings=embeddings,
        lm_head=0 if arch.tied_embeddings else embeddings,
        decoder_linears=arch.layers * per_layer_linears,
        biases=arch.layers * per_layer_biases,
        norms=(2 * arch.layers + 1) * arch.hidden,
    )


def resolve_lora_targets(targets) -> tuple[str, ...]:
    """``"all-linear"`` or an iterable of decoder-linear names → a tuple of names, validated."""
    if isinstance(targets, str):
        if targets in ("all-linear", "all"):
            return LINEAR_NAMES
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = tuple(targets)
    unknown = [n for n in names if n not in LINEAR_NAMES]
    if unknown or not names:
        raise ConfigError(
            f"unknown LoRA target(s) {unknown or '(none)'}; use 'all-linear' or names from {', '.join(LINEAR_NAMES)}."
        )
    return names


def lora_trainable_params(arch: ArchSpec, rank: int, targets="all-linear") -> int:
    """``r·(in + out)`` per targeted linear (A is r x in, B is out x r), over all layers."""
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}.")
    names = set(resolve_lora_targets(targets))
    return arch.layers * sum(rank * (i + o) for n, i, o in arch.linear_shapes() if n in names)


# ----------------------------------------------------------------------------------------------------------
# Weight storage formats
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFormat:
    key: str
    label: str
    kind: str  # "float" | "int" | "nf4"
    bits: int
    group_size: int = 0  # int: inputs per fp16 scale (0 = one per output channel); nf4: block size
    double_quant: bool = False


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.key: f
    for f in (
        WeightFormat("fp32", "fp32", "float", 32),
        WeightFormat("bf16", "bf16 / fp16", "float", 16),
        WeightFormat("int8", "int8 per-channel", "int", 8, 0),
        WeightFormat("int4-g128", "int4 g128", "int", 4, 128),
        WeightFormat("int3-g128", "int3 g128", "int", 3, 128),
        WeightFormat("nf4", "NF4 (block 64)", "nf4", 4, 64),
        WeightFormat("nf4-dq", "NF4 + double quant", "nf4", 4, 64, True),
    )
}


def linear_weight_bytes(in_features: int, out_features: int, fmt: WeightFormat) -> int:
    """Stored bytes of one ``[out, in]`` weight in ``fmt`` (codes densely bit-packed, plus scales)."""
    n = in_features * out_features
    if fmt.kind == "float":
        return n * fmt.bits // 8
    codes = math.ceil(n * fmt.bits / 8)
    if fmt.kind == "int":
        # symmetric: one fp16 scale per group along the input dim (partial last group allowed), no zeros
        groups = 1 if fmt.group_size == 0 else math.ceil(in_features / fmt.group_size)
        return codes + 2 * out_features * groups
    blocks = math.ceil(n / fmt.group_size)  # NF4: blocks over the flattened tensor, float32 absmax each
    if not fmt.double_quant:
        return codes + 4 * blocks
    # double quant: absmax as uint8 codes + one float32 absmax per 256 of them + one float32 offset
    return codes + blocks + 4 * math.ceil(blocks / 256) + 4


def _bits_per_weight_text(fmt: WeightFormat) -> str:
    if fmt.kind == "float":
        return f"{fmt.bits} bits"
    if fmt.kind == "int":
        if fmt.group_size == 0:
            return f"{fmt.bits} bits + fp16 scale per output channel"
        return f"{fmt.bits} bits + fp16 scale per {fmt.group_size} inputs ({fmt.bits + 16 / fmt.group_size:.3f} b/w)"
    if fmt.double_quant:
        bpw = 4 + 8 / fmt.group_size + 32 / (fmt.group_size * 256)
        return f"4 bits + uint8 absmax per {fmt.group_size} + fp32 per 256 blocks ({bpw:.3f} b/w)"
    return f"4 bits + fp32 absmax per {fmt.group_size} ({4 + 32 / fmt.group_size:.3f} b/w)"


# ----------------------------------------------------------------------------------------------------------
# Plan data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    formula: str
    kind: str = "weights"  # weights | kv | grads | optimizer | adapter | activations | buffer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    """One thing to run (inference in a format, or a training recipe) and the memory it needs."""

    key: str
    title: str
    lines: list[Line]
    gradient_checkpointing: bool | None = None  # None for inference

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "title": self.title,
            "gradient_checkpointing": self.gradient_checkpointing,
            "total_bytes": self.total,
            "lines": [line.to_dict() for line in self.lines],
        }


@dataclass(frozen=True)
class TextbookRow:
    item: str
    seed_bytes: int  # the seed's rule of thumb on the nominal size
    exact_bytes: int  # holdall's exact count for this architecture, same scope (no activations)
    seed_formula: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    job: str
    title: str
    total: int
    gpu_bytes: int

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    @property
    def gpus_needed(self) -> int:
        """How many such GPUs the job needs if it could be split evenly (tensor/pipeline parallel, FSDP)."""
        return max(1, math.ceil(self.total / self.gpu_bytes))

    def line(self) -> str:
        if self.fits:
            return f"fits      {self.title}: {_gb(self.total)} of {_gb(self.gpu_bytes)} ({_gb(self.gpu_bytes - self.total)} free)"
        return (
            f"NO FIT    {self.title}: {_gb(self.total)} > {_gb(self.gpu_bytes)} "
            f"(needs >= {self.gpus_needed} such GPUs sharing it, or a smaller format/batch/sequence)"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "gpus_needed": self.gpus_needed}


@dataclass
class MemoryPlan:
    arch: ArchSpec
    params: ParamCounts
    settings: dict
    jobs: dict[str, Job]
    textbook: list[TextbookRow]
    textbook_note: str
    notes: list[str] = field(default_factory=list)
    gpu_bytes: int | None = None

    def job(self, key: str) -> Job:
        if key not in self.jobs:
            raise ConfigError(f"no job '{key}' in this plan; jobs: {', '.join(self.jobs)}.")
        return self.jobs[key]

    def verdicts(self, gpu_bytes=None) -> list[Verdict]:
        gpu = self.gpu_bytes if gpu_bytes is None else parse_bytes(gpu_bytes)
        if gpu is None:
            raise ConfigError("no GPU size to check against; pass gpu='80GB' (or --gpu 80GB).")
        return [Verdict(j.key, j.title, j.total, gpu) for j in self.jobs.values()]

    def to_dict(self) -> dict:
        out = {
            "arch": self.arch.to_dict(),
            "params": self.params.to_dict(),
            "settings": self.settings,
            "jobs": {key: job.to_dict() for key, job in self.jobs.items()},
            "textbook": {"rows": [r.to_dict() for r in self.textbook], "note": self.textbook_note},
            "notes": list(self.notes),
            "gpu_bytes": self.gpu_bytes,
        }
        if self.gpu_bytes is not None:
            out["verdicts"] = [v.to_dict() for v in self.verdicts()]
        return out


def parse_bytes(size) -> int | None:
    """``"80GB"`` → 80e9 (decimal), ``"80GiB"`` → 80·2**30, ``"24"`` → 24e9 (GB), ints pass through."""
    if size is None:
        return None
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"a memory size must be positive, got {size}.")
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(size).lower())
    if not match:
        raise ConfigError(f"cannot read the memory size '{size}'; write it like 80GB, 24GB or 80GiB.")
    number, unit = float(match.group(1)), (match.group(2) or "gb")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    if unit == "b":
        factor = 1
    elif "i" in unit:
        factor = 1 << (10 * ("kmgt".index(unit[0]) + 1))
    else:
        factor = scale[unit[0]]
    if number <= 0:
        raise ConfigError(f"a memory size must be positive, got '{size}'.")
    return int(number * factor)


def fits(target, gpu_bytes, job: str | None = None) -> bool:
    """Does ``target`` (a ``Job``, a byte count, or ``plan`` + ``job`` key) fit in ``gpu_bytes``?"""
    gpu = parse_bytes(gpu_bytes)
    if isinstance(target, MemoryPlan):
        if job is None:
            raise ConfigError(f"fits(plan, gpu) needs job=, one of: {', '.join(target.jobs)}.")
        target = target.job(job)
    total = target.total if isinstance(target, Job) else int(target)
    return total <= gpu


# ----------------------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------------------


def plan_memory(
    arch,
    *,
    batch: int = 1,
    seq_len: int = 2048,
    lora_rank: int = 16,
    lora_targets="all-linear",
    gradient_checkpointing: bool | None = None,
    weight_formats=None,
    kv_cache_bytes: int = 2,
    adapter_bytes: int = 2,
    gpu=None,
) -> MemoryPlan:
    """The memory budget of inference, full fine-tuning, LoRA and QLoRA for ``arch``.

    ``arch``: an ``ArchSpec`` or anything ``load_arch`` accepts. ``gradient_checkpointing``: None plans both
    ways, True/False only one. ``weight_formats``: keys of ``WEIGHT_FORMATS`` for the inference jobs (default
    all). ``adapter_bytes``: bytes per LoRA weight (2 = bf16 as the seed; peft's default upcasts adapters to
    fp32, pass 4 to model that). ``gpu``: e.g. ``"80GB"``, enables the verdict lines.
    """
    arch = load_arch(arch)
    _check_positive(batch=batch, seq_len=seq_len, lora_rank=lora_rank, kv_cache_bytes=kv_cache_bytes,
                    adapter_bytes=adapter_bytes)
    params = count_params(arch)
    targets = resolve_lora_targets(lora_targets)
    trainable = lora_trainable_params(arch, lora_rank, targets)
    formats = _resolve_formats(weight_formats)
    gc_modes = [False, True] if gradient_checkpointing is None else [bool(gradient_checkpointing)]
    ctx = _Ctx(arch, params, batch, seq_len, lora_rank, targets, trainable, adapter_bytes)

    jobs: dict[str, Job] = {}
    for fmt in formats:
        job = _inference_job(ctx, fmt, kv_cache_bytes)
        jobs[job.key] = job
    for build in (_full_ft_seed_job, _full_ft_job, _lora_job, _qlora_job):
        for gc in gc_modes:
            job = build(ctx, gc)
            jobs[job.key] = job

    textbook, note = _textbook_view(ctx)
    settings = {
        "batch": batch,
        "seq_len": seq_len,
        "lora_rank": lora_rank,
        "lora_targets": list(targets),
        "lora_trainable_params": trainable,
        "gradient_checkpointing": gradient_checkpointing,
        "kv_cache_bytes": kv_cache_bytes,
        "adapter_bytes": adapter_bytes,
        "activation_dtype": "bf16",
    }
    return MemoryPlan(arch, params, settings, jobs, textbook, note, _notes(ctx), parse_bytes(gpu))


def _check_positive(**values) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}.")


def _resolve_formats(keys) -> list[WeightFormat]:
    if keys is None:
        return list(WEIGHT_FORMATS.values())
    keys = [keys] if isinstance(keys, str) else list(keys)
    unknown = [k for k in keys if k not in WEIGHT_FORMATS]
    if unknown:
        raise ConfigError(f"unknown weight format(s) {unknown}; choose from {', '.join(WEIGHT_FORMATS)}.")
    return [WEIGHT_FORMATS[k] for k in keys]


@dataclass(frozen=True)
class _Ctx:
    arch: ArchSpec
    params: ParamCounts
    batch: int
    seq_len: int
    rank: int
    targets: tuple[str, ...]
    trainable: int
    adapter_bytes: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def _fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def weights_line(ctx: _Ctx, fmt: WeightFormat, name: str | None = None) -> Line:
    """All model weights in ``fmt``: decoder linears in the format, everything else 16-bit (fp32 in fp32)."""
    arch, p = ctx.arch, ctx.params
    linears = arch.layers * sum(linear_weight_bytes(i, o, fmt) for _, i, o in arch.linear_shapes())
    other_bytes = 4 if fmt.key == "fp32" else 2
    total = linears + other_bytes * p.non_linear
    if fmt.kind == "float":
        formula = f"{_fmt_int(p.total)} params x {fmt.bits // 8} B"
    else:
        formula = (
            f"decoder linears {_fmt_int(p.decoder_linears)} x {_bits_per_weight_text(fmt)} "
            f"+ embeddings/LM head/norms {_fmt_int(p.non_linear)} x 2 B (kept 16-bit)"
        )
    return Line(name or f"weights, {fmt.label}", total, formula, "weights")


def _inference_job(ctx: _Ctx, fmt: WeightFormat, kv_bytes: int) -> Job:
    a = ctx.arch
    kv = 2 * a.layers * a.kv_heads * a.head_dim * ctx.tokens * kv_bytes
    kv_line = Line(
        f"KV cache ({kv_bytes * 8}-bit)",
        kv,
        f"2 (K,V) x {a.layers} layers x {a.kv_heads} kv_heads x {a.head_dim} head_dim x batch {ctx.batch} "
        f"x seq {ctx.seq_len} x {kv_bytes} B",
        "kv",
    )
    return Job(f"inference-{fmt.key}", f"inference, {fmt.label}", [weights_line(ctx, fmt), kv_line])


def _activation_elems_per_token(a: ArchSpec) -> tuple[int, str]:
    """Elements autograd keeps per token in one decoder layer (bf16), and the formula as text.

    RMSNorm 1 input + output (2h); q, k, v after RoPE as kept by flash/SDPA attention (q_dim + 2 kv_dim);
    the attention output, input of o_proj (q_dim); RMSNorm 2 input + output (2h); the MLP's gate, up,
    silu(gate) and silu(gate)*up, the input of down_proj (4i). Linears reuse these as their saved inputs.
    """
    elems = 4 * a.hidden + 2 * a.q_dim + 2 * a.kv_dim + 4 * a.intermediate
    return elems, f"(4h + 2q_dim + 2kv_dim + 4i = {_fmt_int(elems)}) elems"


def activation_lines(ctx: _Ctx, gc: bool, lora: bool) -> list[Line]:
    """Saved activations for one training step (bf16), with or without per-layer gradient checkpointing."""
    a, t = ctx.arch, ctx.tokens
    per_tok, per_tok_formula = _activation_elems_per_token(a)
    if lora:
        # each LoRA A output (r values per token per target) is kept for B's backward
        extra = ctx.rank * len(ctx.targets)
        per_tok += extra
        per_tok_formula = (
            f"(4h + 2q_dim + 2kv_dim + 4i + r x {len(ctx.targets)} LoRA A outputs = {_fmt_int(per_tok)}) elems"
        )
    tok_text = f"batch {ctx.batch} x seq {ctx.seq_len}"
    lines = []
    if gc:
        lines.append(Line(
            "activations: layer inputs (checkpoints)",
            a.layers * t * a.hidden * 2,
            f"{a.layers} layers x {tok_text} x hidden {a.hidden} x 2 B",
            "activations",
        ))
        lines.append(Line(
            "activations: one layer recomputed in backward",
            t * per_tok * 2,
            f"{tok_text} x {per_tok_formula} x 2 B",
            "activations",
        ))
    else:
        lines.append(Line(
            "activations: all decoder layers",
            a.layers * t * per_tok * 2,
            f"{a.layers} layers x {tok_text} x {per_tok_formula} x 2 B",
            "activations",
        ))
    lines.append(Line(
        "activations: final norm + logits for the loss",
        t * (2 * a.hidden * 2 + a.vocab * 8),
        f"{tok_text} x (2 x hidden x 2 B + vocab {a.vocab} x (4 B fp32 logits + 4 B fp32 log-probs))",
        "activations",
    ))
    return lines


def _suffix(gc: bool) -> tuple[str, str]:
    return ("+gc", ", gradient checkpointing") if gc else ("", "")


def _full_ft_seed_job(ctx: _Ctx, gc: bool) -> Job:
    n = ctx.params.total
    key, title = _suffix(gc)
    lines = [
        Line("weights (fp16/bf16)", 2 * n, f"{_fmt_int(n)} params x 2 B", "weights"),
        Line("gradients (fp16/bf16)", 2 * n, f"{_fmt_int(n)} params x 2 B", "grads"),
        Line(
            "optimizer: Adam m, v (fp32) [seed: 'FP32 master + 2 x FP32 moments']",
            8 * n,
            f"{_fmt_int(n)} params x 8 B (2 fp32 moments; no room for a master copy)",
            "optimizer",
        ),
    ]
    lines += activation_lines(ctx, gc, lora=False)
    return Job(f"full-ft-seed{key}", f"full fine-tune, seed's 2+2+8 B/param{title}", lines, gc)


def _full_ft_job(ctx: _Ctx, gc: bool) -> Job:
    n = ctx.params.total
    key, title = _suffix(gc)
    lines = [
        Line("weights (fp16/bf16)", 2 * n, f"{_fmt_int(n)} params x 2 B", "weights"),
        Line("gradients (fp16/bf16)", 2 * n, f"{_fmt_int(n)} params x 2 B", "grads"),
        Line("optimizer: fp32 master weights", 4 * n, f"{_fmt_int(n)} params x 4 B", "optimizer"),
        Line("optimizer: Adam m, v (fp32)", 8 * n, f"{_fmt_int(n)} params x 8 B", "optimizer"),
    ]
    lines += activation_lines(ctx, gc, lora=False)
    return Job(f"full-ft{key}", f"full fine-tune, mixed-precision Adam 2+2+12 B/param{title}", lines, gc)


def adapter_lines(ctx: _Ctx) -> list[Line]:
    t = ctx.trainable
    a = ctx.arch
    # group targets of equal in+out so the formula stays short: 4 x (4096+4096) + 3 x (4096+11008)
    groups: dict[tuple[int, int], int] = {}
    for n, i, o in a.linear_shapes():
        if n in ctx.targets:
            pair = (min(i, o), max(i, o))
            groups[pair] = groups.get(pair, 0) + 1
    per_layer = " + ".join(f"{k} x ({i}+{o})" for (i, o), k in groups.items())
    targets = "all-linear" if ctx.targets == LINEAR_NAMES else ",".join(ctx.targets)
    return [
        Line(
            f"LoRA adapter weights (r={ctx.rank}, {targets})",
            ctx.adapter_bytes * t,
            f"{_fmt_int(t)} params = r {ctx.rank} x {a.layers} layers x [{per_layer}] x {ctx.adapter_bytes} B",
            "adapter",
        ),
        Line("LoRA gradients (bf16)", 2 * t, f"{_fmt_int(t)} params x 2 B", "grads"),
        Line("LoRA optimizer: Adam m, v (fp32)", 8 * t, f"{_fmt_int(t)} params x 8 B", "optimizer"),
    ]


def _lora_job(ctx: _Ctx, gc: bool) -> Job:
    key, title = _suffix(gc)
    lines = [weights_line(ctx, WEIGHT_FORMATS["bf16"], "base weights, bf16 (frozen)")]
    lines += adapter_lines(ctx)
    lines += activation_lines(ctx, gc, lora=True)
    return Job(f"lora{key}", f"LoRA on a 16-bit base{title}", lines, gc)


def _qlora_job(ctx: _Ctx, gc: bool) -> Job:
    key, title = _suffix(gc)
    biggest = max(ctx.arch.linear_shapes(), key=lambda s: s[1] * s[2])
    lines = [weights_line(ctx, WEIGHT_FORMATS["nf4-dq"], "base weights, NF4 + double quant (frozen)")]
    lines.append(Line(
        "dequantization buffer (one bf16 weight at a time)",
        biggest[1] * biggest[2] * 2,
        f"largest linear {biggest[0]} {biggest[2]}x{biggest[1]} x 2 B",
        "buffer",
    ))
    lines += adapter_lines(ctx)
    lines += activation_lines(ctx, gc, lora=True)
    return Job(f"qlora{key}", f"QLoRA (NF4 + DQ base){title}", lines, gc)


# ----------------------------------------------------------------------------------------------------------
# The seed's view
# ----------------------------------------------------------------------------------------------------------


def seed_budget(n_params: float = SEED_PARAMS, trainable: float = SEED_TRAINABLE) -> dict[str, float]:
    """The seed's rules of thumb (bytes): 2 B/param weights, 2+2+8 full FT, NF4 0.5 B/param, adapters 2+8."""
    return {
        "weights_fp16": 2 * n_params,
        "full_ft": (2 + 2 + 8) * n_params,
        "lora": 2 * n_params + (2 + 8) * trainable,
        "qlora": 0.5 * n_params + (2 + 8) * trainable,
    }


def _textbook_view(ctx: _Ctx) -> tuple[list[TextbookRow], str]:
    p, a = ctx.params, ctx.arch
    nominal = a.nominal_params or float(f"{p.total:.2g}")
    # The seed's 7B example has ~20M trainable adapter params; scale that share to other sizes.
    seed_trainable = SEED_TRAINABLE * nominal / SEED_PARAMS
    seed = seed_budget(nominal, seed_trainable)
    adapters = sum(line.bytes for line in adapter_lines(ctx))
    bf16 = weights_line(ctx, WEIGHT_FORMATS["bf16"]).bytes
    nf4dq = weights_line(ctx, WEIGHT_FORMATS["nf4-dq"]).bytes
    n_txt, t_txt = _short(nominal), _short(seed_trainable)
    rows = [
        TextbookRow("weights, fp16", int(seed["weights_fp16"]), bf16, f"{n_txt} x 2 B"),
        TextbookRow("full fine-tune (weights + grads + Adam)", int(seed["full_ft"]), 12 * p.total,
                    f"{n_txt} x (2 + 2 + 8) B"),
        TextbookRow("LoRA, before activations", int(seed["lora"]), bf16 + adapters,
                    f"{n_txt} x 2 B + {t_txt} x (2 + 8) B"),
        TextbookRow("QLoRA, before activations", int(seed["qlora"]), nf4dq + adapters,
                    f"{n_txt} x 0.5 B + {t_txt} x (2 + 8) B"),
    ]
    targets = "all-linear" if ctx.targets == LINEAR_NAMES else ",".join(ctx.targets)
    note = (
        f"Why they differ: the seed rounds to {n_txt} parameters ({a.name} has {_fmt_int(p.total)}) and assumes "
        f"~{t_txt} trainable adapter parameters (r={ctx.rank} on {targets} trains {_fmt_int(ctx.trainable)}); "
        f"it leaves out the adapter weights themselves, and its NF4 line is 0.5 B for every parameter, while "
        f"here the embeddings and LM head ({_fmt_int(p.embeddings + p.lm_head)} params) stay 16-bit and NF4 with "
        f"double quantization costs {4 + 8 / 64 + 32 / (64 * 256):.3f} bits per weight. Neither column counts "
        f"activations, the KV cache or framework overhead."
    )
    return rows, note


def _short(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:g}B"
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    return f"{n:,.0f}"


def _notes(ctx: _Ctx) -> list[str]:
    a = ctx.arch
    notes = [
        "GB = 1e9 bytes (GPU marketing and the seed use it); GiB = 2**30 bytes (what nvidia-smi and torch report).",
        "Quantized formats quantize only the decoder linears; embeddings, LM head, norms and biases stay 16-bit.",
        "Activations: bf16, SDPA/flash attention (no seq x seq scores kept), no dropout; per-layer saved tensors "
        "counted explicitly (h = hidden, i = intermediate); norm/softmax statistics, CUDA context (~0.5-1 GB), "
        "allocator fragmentation and workspaces are not counted.",
        "Gradient checkpointing = one checkpoint per decoder layer (transformers' gradient_checkpointing_enable).",
        "The seed's 2+2+8 B/param calls 8 B 'FP32 master + 2 x FP32 moments', but 8 B only holds the two fp32 "
        "Adam moments; mixed precision with a separate fp32 master copy is 2+2+12 (full-ft jobs).",
        f"LoRA adapters at {ctx.adapter_bytes} B/param (peft's default autocast_adapter_dtype keeps them fp32: "
        "pass adapter_bytes=4); an 8-bit or paged optimizer shrinks the 8 B/param Adam states.",
    ]
    if a.max_position is not None and ctx.seq_len > a.max_position:
        notes.append(
            f"seq_len {ctx.seq_len} exceeds the model's max_position_embeddings {a.max_position}: the model "
            f"was not trained that long (RoPE scaling needed)."
        )
    return notes


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def _gb(n: int | float) -> str:
    return f"{n / GB:.2f} GB"


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_params(plan: MemoryPlan) -> str:
    a, p = plan.arch, plan.params
    lines = [
        f"{a.name} ({a.model_type}): hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, "
        f"{a.heads} heads / {a.kv_heads} kv heads x {a.head_dim}, vocab {a.vocab}, "
        f"{'tied' if a.tied_embeddings else 'untied'} embeddings, max positions {a.max_position}",
        f"parameters {p.total:>16,}   embeddings {p.embeddings:,}  LM head {p.lm_head:,}"
        f"{' (tied)' if a.tied_embeddings else ''}  decoder linears {p.decoder_linears:,}  norms {p.norms:,}"
        + (f"  biases {p.biases:,}" if p.biases else ""),
        f"LoRA r={plan.settings['lora_rank']} on {','.join(plan.settings['lora_targets'])}: "
        f"{plan.settings['lora_trainable_params']:,} trainable ({100 * plan.settings['lora_trainable_params'] / p.total:.3f}%)",
    ]
    return "\n".join(lines)


def format_inference(plan: MemoryPlan) -> str:
    jobs = [j for j in plan.jobs.values() if j.gradient_checkpointing is None]
    if not jobs:
        return ""
    s = plan.settings
    out = [f"Inference (batch {s['batch']} x seq {s['seq_len']})",
           f"  {'format':<20} {'weights':>10} {'KV cache':>10} {'total':>10} {'total':>11}   weights formula"]
    for job in jobs:
        weights, kv = job.lines
        out.append(
            f"  {job.title.removeprefix('inference, '):<20} {weights.bytes / GB:>7.2f} GB {kv.bytes / GB:>7.2f} GB "
            f"{_gb(job.total):>10} {_gib(job.total):>11}   {weights.formula}"
        )
    out.append(f"  KV cache = {jobs[0].lines[1].formula}")
    return "\n".join(out)


def format_job(job: Job) -> str:
    width = max(len(line.name) for line in job.lines)
    out = [job.title]
    for line in job.lines:
        out.append(f"  {line.name:<{width}}  {_gb(line.bytes):>10}   {line.formula}")
    out.append(f"  {'total':<{width}}  {_gb(job.total):>10}   ({_gib(job.total)})")
    return "\n".join(out)


def format_textbook(plan: MemoryPlan) -> str:
    width = max(len(r.item) for r in plan.textbook)
    out = [
        "Textbook view (decimal GB, no activations): the seed's rules of thumb vs exact for " + plan.arch.name,
        f"  {'':<{width}}  {'seed':>9}  {'exact':>9}   seed's formula",
    ]
    for r in plan.textbook:
        out.append(f"  {r.item:<{width}}  {r.seed_bytes / GB:>6.2f} GB  {r.exact_bytes / GB:>6.2f} GB   {r.seed_formula}")
    out.append("  " + plan.textbook_note)
    return "\n".join(out)


def format_verdicts(plan: MemoryPlan, gpu_bytes=None) -> str:
    verdicts = plan.verdicts(gpu_bytes)
    gpu = verdicts[0].gpu_bytes
    head = (
        f"Fit check, one GPU of {_gb(gpu)} ({_gib(gpu)}); cards sold as '80 GB' hold about 80 GiB, so pass "
        f"80GiB to use the whole card, and keep 1-2 GB for what the plan does not count"
    )
    return "\n".join([head] + ["  " + v.line() for v in verdicts])


def format_plan(plan: MemoryPlan) -> str:
    """The whole plan as readable text: parameters, inference table, training budgets, textbook view, fit."""
    parts = [format_params(plan)]
    inference = format_inference(plan)
    if inference:
        parts.append(inference)
    parts.extend(format_job(j) for j in plan.jobs.values() if j.gradient_checkpointing is not None)
    parts.append(format_textbook(plan))
    if plan.gpu_bytes is not None:
        parts.append(format_verdicts(plan))
    parts.append("Notes:\n" + "\n".join(f"  - {n}" for n in plan.notes))
    return "\n\n".join(parts)


def render(plan: MemoryPlan) -> str:
    """Alias of ``format_plan`` for the CLI."""
    return format_plan(plan)
