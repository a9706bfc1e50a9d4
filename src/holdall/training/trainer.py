"""A small, generic training loop over the parameters that require grad.

What it does per optimizer step: ``grad_accum`` micro-batches (the loss of each weighted by its share of the
step's target tokens, so the step's loss is the token mean over all of them) -> gradient clipping ->
optimizer step -> LR schedule (linear warmup, then cosine / linear decay, or constant).
Every ``eval_every`` steps: loss on the eval split. Every ``save_every`` steps (and at the end): a checkpoint.

Checkpoints (``<output_dir>/checkpoint/``, replaced atomically as a whole directory): the trainable
parameters (``trainable.safetensors``), the optimizer and scheduler state, every RNG state (torch, CUDA,
Python) and the step / data position (``trainer_state.pt`` + a readable ``trainer_state.json``).
``train(resume=True)`` restores all of it, so a resumed run computes exactly the losses an uninterrupted
run would (same data order: epoch ``e`` is shuffled with ``seed + e``; same dropout masks: RNG restored).

Logs: ``metrics.jsonl`` (one JSON object per step / eval; a resumed run first drops lines after the
checkpoint's step), a tqdm bar showing loss and tokens/s, and ``loss_curve.png`` at the end.
A NaN/Inf loss or gradient stops training with :class:`TrainingDivergedError`, naming the step; the last
checkpoint (written before the bad step) is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, HoldallError
from ..fileio import atomic_dir, atomic_path, write_json
from .data import Example, collate
from .optim import build_optimizer

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class TrainingDivergedError(HoldallError):
    """The loss or gradient became NaN/Inf; the message names the step and what to change."""


@dataclass
class TrainerConfig:
    """How to train. ``max_steps`` (optimizer steps) wins over ``epochs`` when both are set."""

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    warmup: float = 0.03  # < 1: a fraction of the total steps; >= 1: a number of steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    eval_every: int | None = None  # steps; None: only at the end (when there is an eval split)
    save_every: int | None = None  # steps; None: only at the end
    log_every: int = 1
    seed: int = 0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: run forward/backward under autocast
    progress: bool = True
    # LoRA on a Llama-shaped model: training.fast_step's fused step (its own checkpointing; in the model's dtype,
    # autocast unused); cuda_graphs replays it as CUDA graphs on a GPU
    fast_step: bool = False
    cuda_graphs: bool = False

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0 (a fraction < 1 or a number of steps), got {self.warmup}")


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None  # mean loss of the last logged step
    eval_loss: float | None
    tokens: int
    tokens_per_s: float
    metrics_path: Path
    plot_path: Path | None
    checkpoint_path: Path | None
    history: list[dict] = field(default_factory=list, repr=False)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s`` (0-based): linear warmup from 1/(warmup+1), then decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains ``model``'s parameters that require grad on ``train_data`` (lists of :class:`Example`).

    save_model: ``(model, directory) -> None``, called at the end to write the final weights (e.g. a PEFT
    adapter) into ``output_dir``; None saves nothing but the checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: list[Example],
        eval_data: list[Example] | None,
        config: TrainerConfig,
        output_dir: str | os.PathLike,
        pad_id: int = 0,
        save_model: Callable[[nn.Module, Path], None] | None = None,
    ):
        if not train_data:
            raise ConfigError("no training sequences; check the data file and max_len")
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data or []
        self.config = config
        self.output_dir = Path(output_dir)
        self.pad_id = pad_id
        self.save_model = save_model
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ConfigError("the model has no parameter that requires grad; add an adapter (add_lora) first")
        self.params = [p for _, p in self.named_params]
        self.device = self.params[0].device
        self.batches_per_epoch = math.ceil(len(train_data) / config.batch_size)
        self.total_steps = self._total_steps()
        warmup = config.warmup if config.warmup >= 1 else config.warmup * self.total_steps
        self.warmup_steps = int(round(warmup))
        self.optimizer = build_optimizer(config.optimizer, self.params, config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.warmup_steps, config.schedule)
        )
        self.step = 0
        self.batch_index = 0  # micro-batches consumed since the start of training: the data position
        self.tokens = 0
        self.history: list[dict] = []
        self._fast_step = None  # training.fast_step.FastStep when config.fast_step
        if config.fast_step:  # built now, so an unsupported model or trainable set is refused before any step
            from .fast_step import FastStep, FastStepConfig

            self._fast_step = FastStep(model, FastStepConfig(cuda_graphs=config.cuda_graphs))

    # --- data order ------------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        micro = math.ceil(self.config.epochs * self.batches_per_epoch)
        return max(1, math.ceil(micro / self.config.grad_accum))

    def _epoch_order(self, epoch: int) -> list[int]:
        # a pure function of (seed, epoch): resuming needs only the position, not an iterator's state
        order = list(range(len(self.train_data)))
        random.Random(self.config.seed + epoch).shuffle(order)
        return order

    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(index, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        picked = order[within * self.config.batch_size : (within + 1) * self.config.batch_size]
        batch = collate([self.train_data[i] for i in picked], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- one step --------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = self.config.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self) -> dict:
        cfg = self.config
        batches = [self._micro_batch(self.batch_index + i) for i in range(cfg.grad_accum)]
        # targets are the labels shifted by one (the model shifts internally): count the ones that score
        targets = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        total_targets = max(1, sum(targets))
        loss_sum = 0.0
        tokens = 0
        for batch, n_targets in zip(batches, targets):
            if n_targets == 0:
                continue  # (all labels masked: HF returns NaN for an empty mean; nothing to learn here)
            if cfg.fast_step:  # loss and gradients in one fused pass (the gradients already scaled)
                loss = self._fast_step(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    grad_scale=n_targets / total_targets)
                self._check_finite(loss, "loss")
            else:
                with self._autocast():
                    loss = self.model(**batch).loss  # mean over this micro-batch's targets
                self._check_finite(loss, "loss")
                (loss * (n_targets / total_targets)).backward()
            loss_sum += float(loss.detach()) * n_targets
            tokens += int(batch["attention_mask"].sum())
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.batch_index += cfg.grad_accum
        self.step += 1
        self.tokens += tokens
        return {"step": self.step, "loss": loss_sum / total_targets, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _clip(self) -> float | None:
        if self.config.max_grad_norm is None:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._check_finite(norm, "gradient norm")
        return float(norm)

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        if not torch.isfinite(value).all():
            where = f"; the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.exists() else ""
            raise TrainingDivergedError(
                f"the {what} became {float(value)} at step {self.step + 1} (lr {self.scheduler.get_last_lr()[0]:.3g}). "
                f"Training diverged: lower the learning rate (e.g. {self.config.lr / 10:.3g}), keep gradient clipping "
                f"on (max_grad_norm), or use float32 compute{where}"
            )

    # --- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the eval split (dropout off), or None without an eval split."""
        if not self.eval_data:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(self.eval_data), self.config.batch_size):
                batch = collate(self.eval_data[i : i + self.config.batch_size], self.pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                if n == 0:
                    continue
                with self._autocast():
                    loss = self.model(**batch).loss
                total += float(loss) * n
                count += n
        finally:
            self.model.train(was_training)
        return total / count if count else None

    # --- checkpoints -----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path:
        """Write the whole training state atomically to ``<output_dir>/checkpoint`` (replacing the last one)."""
        from safetensors.torch import save_file

        state = {
            "step": self.step,
            "batch_index": self.batch_index,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "history": self.history,
        }
        with atomic_dir(self.checkpoint_path, overwrite=True) as tmp:
            tensors = {name: p.detach().to("cpu").contiguous() for name, p in self.named_params}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "trainer_state.pt")
            readable = {k: state[k] for k in ("step", "batch_index", "tokens", "total_steps")}
            config = asdict(self.config)
            readable["config"] = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in config.items()}
            write_json(tmp / "trainer_state.json", readable)
        return self.checkpoint_path

    def load_checkpoint(self) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (the model must have the same trainable parameters)."""
        from safetensors.torch import load_file

        ckpt = self.checkpoint_path
        if not (ckpt / "trainer_state.pt").is_file():
            raise ConfigError(f"resume=True but {ckpt} holds no checkpoint; start without resume (or check output_dir)")
        stored = load_file(str(ckpt / "trainable.safetensors"))
        names = [n for n, _ in self.named_params]
        if sorted(stored) != sorted(names):
            raise CorruptFileError(
                f"the checkpoint in {ckpt} trains other parameters ({len(stored)} tensors) than this model "
                f"({len(names)}); resume with the same model, method and adapter settings, or use a new output_dir"
            )
        with torch.no_grad():
            for name, p in self.named_params:
                p.copy_(stored[name])
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state["total_steps"] != self.total_steps:
            raise ConfigError(
                f"the checkpoint was made for a run of {state['total_steps']} steps, this one has {self.total_steps}; "
                "resume with the same data, epochs/max_steps, batch size and grad_accum "
                "(the LR schedule depends on them)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.batch_index = state["batch_index"]
        self.tokens = state["tokens"]
        self.history = list(state["history"])

    # --- the loop --------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if resume:
            self.load_checkpoint()
        self._rewrite_metrics()  # a fresh run starts an empty log; a resumed one keeps lines up to its step
        self.model.train()
        bar = _progress(cfg.progress, self.total_steps, self.step)
        started, tokens_at_start = time.perf_counter(), self.tokens
        eval_loss = None
        try:
            while self.step < self.total_steps:
                record = self._train_step()
                elapsed = time.perf_counter() - started
                record["tokens_per_s"] = (self.tokens - tokens_at_start) / max(elapsed, 1e-9)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(record)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    eval_loss = self._log_eval()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.1f}")
        finally:
            if bar is not None:
                bar.close()
        if self.eval_data:
            eval_loss = self._log_eval()
        checkpoint = self.save_checkpoint()
        if self.save_model is not None:
            self.save_model(self.model, self.output_dir)
        plot = self._plot()
        elapsed = time.perf_counter() - started
        last = [h for h in self.history if "loss" in h]
        return TrainResult(
            steps=self.step,
            train_loss=last[-1]["loss"] if last else None,
            eval_loss=eval_loss,
            tokens=self.tokens,
            tokens_per_s=(self.tokens - tokens_at_start) / max(elapsed, 1e-9),
            metrics_path=self.output_dir / METRICS_FILE,
            plot_path=plot,
            checkpoint_path=checkpoint,
            history=list(self.history),
        )

    def _log_eval(self) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self._check_finite(torch.tensor(loss), "eval loss")
            self._log({"step": self.step, "eval_loss": loss})
        return loss

    def _log(self, record: dict) -> None:
        self.history.append(record)
        # an append-only log: a crash can at worst cut its last line; resume rewrites it atomically
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _rewrite_metrics(self) -> None:
        with atomic_path(self.output_dir / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def _plot(self) -> Path | None:
        from .plots import save_loss_curve

        try:
            return save_loss_curve(self.history, self.output_dir / PLOT_FILE)
        except ImportError:  # matplotlib is optional: the metrics log has the same numbers
            return None


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
