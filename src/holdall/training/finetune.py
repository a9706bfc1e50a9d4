"""``finetune()`` and ``merge()``: the verbs behind ``holdall finetune`` and ``holdall merge``.

finetune: load the base (float32 on CPU, bf16 on GPU) -> qlora: NF4 + double quant (blocks of 64) on every
decoder linear (codes rounded to nearest, or with ``base_quant="gptq"`` chosen by GPTQ error feedback on
calibration activations: the training split by default, or ``calib`` text) -> LoRA adapters (float32) -> train
on a JSONL/txt file -> ``output_dir`` holds the PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``), ``metrics.jsonl``, ``loss_curve.png`` and ``checkpoint/`` (for ``resume=True``).

merge: load the *float* base afresh, load the adapter, fold it in (``W + scaling * B @ A``) and save a plain
Hugging Face directory. Merging into a 4-bit base would round the weights twice, so a holdall-quantized
directory is refused as a base.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..models import load_model, resolve_model, save_hf
from ..tuners.lora import LoraConfig, load_adapter, merge_lora, save_adapter, trainable_report
from .data import build_datasets
from .optim import OPTIMIZERS
from .qlora import QLoraBase, calibration_from_examples, prepare_model
from .trainer import Trainer, TrainerConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every knob of a LoRA / QLoRA run (the CLI flags map one to one; see the field comments)."""

    method: Literal["lora", "qlora"] = "qlora"
    # adapter
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "all-linear"  # or module-name suffixes ("q_proj", "v_proj"), or "re:<regex>"
    # qlora base: how the NF4 codes are chosen (the storage is NF4 + double quant either way)
    base_quant: Literal["rtn", "gptq"] = "rtn"  # gptq: error feedback against calibration activations
    calib: str | None = None  # gptq: calibration text file; None = the training split's own token ids
    calib_samples: int = 64  # gptq: calibration windows
    calib_seq_len: int | None = None  # gptq: tokens per window; None = max_len, at most 512
    base_act_order: bool = True  # gptq: columns by decreasing Hessian diagonal (static block scales)
    base_refit_scales: bool = True  # gptq: least-squares re-fit of the block scales for the chosen codes
    # optimisation
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; wins over epochs
    batch_size: int = 1
    grad_accum: int = 1
    warmup: float = 0.03  # < 1: fraction of the steps; >= 1: steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "fused_adamw8bit",
                       "paged_fused_adamw8bit"] = "adamw"
    # data
    max_len: int = 512
    packing: bool = False
    eval_fraction: float = 0.0
    # bookkeeping
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 1
    gradient_checkpointing: bool = True
    fast_step: bool = False  # training.fast_step: fused LoRA/QLoRA step (Llama-shaped models, LoRA-only training)
    cuda_graphs: bool = False  # with fast_step on a GPU: replay each layer as CUDA graphs
    seed: int = 0
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    progress: bool = True

    def __post_init__(self):
        if self.method not in ("lora", "qlora"):
            raise ConfigError(f"method must be 'lora' or 'qlora', got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ConfigError(f"max_len must be an integer >= 2, got {self.max_len!r}")
        if self.base_quant != "rtn" and self.method != "qlora":
            raise ConfigError(
                f"base_quant={self.base_quant!r} chooses the codes of QLoRA's NF4 base; method {self.method!r} trains "
                "on the float base. Use method='qlora' (CLI: --method qlora) or drop base_quant"
            )
        if self.calib is not None and self.base_quant != "gptq":
            raise ConfigError("calib (calibration text) is used by base_quant='gptq' only (CLI: --base-quant gptq)")
        if self.cuda_graphs and not self.fast_step:
            raise ConfigError("cuda_graphs replays the fast step; set fast_step=True too (CLI: --fast-step)")
        self.qlora_base()  # validates the base-quantization fields
        self.lora_config()  # validates r / alpha / dropout / targets now, not after the model has loaded
        self.trainer_config(None)  # validates the optimisation fields

    def qlora_base(self) -> QLoraBase:
        return QLoraBase(
            method=self.base_quant, calib=self.calib, calib_samples=self.calib_samples,
            calib_seq_len=self.calib_seq_len, act_order=self.base_act_order, refit_scales=self.base_refit_scales,
            seed=self.seed,
        )

    def calibration_seq_len(self) -> int:
        return self.calib_seq_len or min(self.max_len, 512)

    def lora_config(self) -> LoraConfig:
        targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=targets)

    def trainer_config(self, autocast_dtype: torch.dtype | None) -> TrainerConfig:
        return TrainerConfig(
            lr=self.lr, epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
            grad_accum=self.grad_accum, warmup=self.warmup, schedule=self.schedule, max_grad_norm=self.max_grad_norm,
            weight_decay=self.weight_decay, optimizer=self.optimizer, eval_every=self.eval_every,
            save_every=self.save_every, log_every=self.log_every, seed=self.seed, autocast_dtype=autocast_dtype,
            progress=self.progress, fast_step=self.fast_step, cuda_graphs=self.cuda_graphs,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.base_quant == "rtn":  # the base-quantization knobs mean nothing then: records (and the pipeline's
            for key in _BASE_QUANT_FIELDS:  # stage fingerprints) stay exactly as they were before these fields existed
                del data[key]
        if not self.fast_step:  # likewise for the fast step's switches
            for key in ("fast_step", "cuda_graphs"):
                del data[key]
        return data


_BASE_QUANT_FIELDS = ("base_quant", "calib", "calib_samples", "calib_seq_len", "base_act_order", "base_refit_scales")


@dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path  # == output_dir: the PEFT files sit at its top level
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    tokens_per_s: float
    metrics_path: Path
    plot_path: Path | None
    checkpoint_path: Path | None
    trainable: str  # trainable_report(model)


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on an accelerator and on CPUs with native bf16 math (AVX512-BF16 / AMX); float32 on other
    CPUs, where bf16 is emulated and slower than float32."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.bfloat16


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 dot products in hardware (x86 avx512_bf16 or amx_bf16 flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:  # not Linux: stay with float32, always correct
        pass
    return False


def autocast_dtype(model: nn.Module, compute: torch.dtype, method: str) -> torch.dtype | None:
    """The autocast dtype the trainer runs under: none for float32 compute; bf16/fp16 compute on a float32
    model (or any QLoRA base, whose dequantized weights follow autocast) runs under autocast."""
    if compute == torch.float32:
        return None
    return compute if _float_dtype(model) == torch.float32 or method == "qlora" else None


def finetune(
    model_spec_or_model: Any,
    data_path: str | os.PathLike,
    config: FinetuneConfig | None = None,
    output_dir: str | os.PathLike = "adapter",
    tokenizer: Any = None,
    resume: bool = False,
) -> FinetuneResult:
    """Train a LoRA (or QLoRA) adapter on ``data_path``; the adapter lands in ``output_dir`` (PEFT format).

    model_spec_or_model: anything ``holdall.models.load_model`` takes (hub id, HF dir, .gguf, alias such as
    "smollm2", a holdall-quantized dir for qlora) or an ``nn.Module`` (modified in place; pass ``tokenizer``).
    resume: continue from ``output_dir/checkpoint`` with the same settings (the same loss curve, exactly).
    """
    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    output_dir = Path(output_dir)
    if config.calib is not None and not Path(config.calib).is_file():
        raise DataError(
            f"calibration text not found: {config.calib}; pass an existing UTF-8 text file (CLI: --calib FILE), "
            "or leave it out to calibrate the QLoRA base on the training data"
        )
    device = pick_device(config.device)
    dtype = pick_compute_dtype(config.compute_dtype, device)
    torch.manual_seed(config.seed)  # the LoRA A init is drawn from torch's RNG: same seed, same adapter
    model, tokenizer = _load_base(model_spec_or_model, tokenizer, dtype, device)
    data = build_datasets(data_path, tokenizer, config.max_len, config.packing, config.eval_fraction, config.seed)
    base = dataclasses.replace(config.qlora_base(), calib_seq_len=config.calibration_seq_len())
    calibration = None
    if config.method == "qlora" and base.method == "gptq" and base.calib is None:
        calibration = calibration_from_examples(
            data.train, base.calib_samples, config.calibration_seq_len(), config.seed
        )
    prepare_model(
        model, config.method, config.lora_config(), config.gradient_checkpointing, base=base,
        tokenizer=tokenizer, calibration_ids=calibration,
    )
    report = trainable_report(model)
    autocast = autocast_dtype(model, dtype, config.method)
    trainer = Trainer(
        model, data.train, data.eval, config.trainer_config(autocast), output_dir,
        pad_id=_pad_id(tokenizer), save_model=_save_adapter_into,
    )
    result = trainer.train(resume=resume)
    return FinetuneResult(
        output_dir=output_dir.resolve(), adapter_dir=output_dir.resolve(), steps=result.steps,
        train_loss=result.train_loss, eval_loss=result.eval_loss, tokens=result.tokens,
        tokens_per_s=result.tokens_per_s, metrics_path=result.metrics_path, plot_path=result.plot_path,
        checkpoint_path=result.checkpoint_path, trainable=report,
    )


def _load_base(spec: Any, tokenizer: Any, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    if isinstance(spec, nn.Module):
        if tokenizer is None:
            raise ConfigError("finetune() got a model object but no tokenizer; pass tokenizer=...")
        return spec.to(device), tokenizer
    model, loaded_tokenizer = load_model(spec, dtype=dtype, device=device)
    tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ConfigError(f"{spec} ships no tokenizer; pass tokenizer=... (or a directory that has one)")
    return model, tokenizer


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _save_adapter_into(model: nn.Module, output_dir: Path) -> None:
    """save_adapter writes a whole directory atomically; the run's directory also holds the checkpoint, the
    metrics and the plot, so write the adapter beside it and move its files in (each move atomic)."""
    staging = output_dir.parent / f".{output_dir.name}.adapter"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        save_adapter(model, staging)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge(
    base_spec: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold a LoRA adapter into a freshly loaded float base and save a plain Hugging Face directory.

    dtype: the dtype to load and save the base in (None: float32; pass torch.bfloat16 to halve the output).
    The LoRA delta is added in float32 and rounded once to that dtype.
    """
    source = resolve_model(base_spec)
    if source.kind == "holdall":
        raise ConfigError(
            f"{base_spec} is a holdall-quantized model; merge at full precision: pass the original float model "
            "(hub id, HF directory or .gguf) as the base, then quantize the merged model once if you want it smaller"
        )
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; pass overwrite=True (CLI: --force) to replace it")
    model, tokenizer = load_model(source, dtype=dtype or torch.float32)
    load_adapter(model, adapter_dir)
    model = merge_lora(model)
    return save_hf(model, tokenizer, output, overwrite=overwrite)
