"""``run_pipeline``: fine-tune every customer, merge at full precision, quantize once per target, evaluate
everything against the base, write the report — resumably.

Stages, in order (each one's outputs under the run's directory):

    eval/base                    the float base on every customer's held-out records and on general text
    finetune/<customer>          adapters/<customer>/      LoRA or QLoRA adapter (PEFT format) + curve
    merge/<customer>             merged/<customer>/        the adapter folded into the *float* base
    eval/<customer>/merged
    build/<customer>/<target>    artifacts/<customer>/<target>/   a GGUF file or a holdall-quantized dir,
    eval/<customer>/<target>                                       always made from merged/<customer>
    build/<target>, eval/<target>   artifacts/<target>/       (adapters targets) one quantized base + all adapters
    report                       report/report.md, plots; a model card (README.md) in every artifact

A stage whose fingerprint and outputs are already recorded in ``state.json`` is skipped, so a crash or Ctrl-C
in stage N resumes at stage N; an interrupted fine-tune continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..fileio import atomic_dir, write_json
from .. import formats as _formats  # noqa: F401  (registers the GPTQ / AWQ / compressed-tensors readers)
from ..models.loading import load_model, load_tokenizer, resolve_model
from .config import PipelineConfig, TargetSpec
from .state import PipelineState, RunLock, file_digest, fingerprint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Stage:
    id: str
    run: Callable[[], list[Path]]  # does the work, returns the paths that must exist for it to count as done
    inputs: Any  # what the stage's result depends on besides its dependencies
    deps: tuple[str, ...] = ()


@dataclass
class PipelineResult:
    output_dir: Path
    report_path: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (of the run that did it)


class _ModelCache:
    """Keeps the last few loaded models: the base and the current customer's merged model serve as references
    for several evaluations in a row."""

    def __init__(self, size: int = 2):
        self.size = size
        self.models: dict[str, torch.nn.Module] = {}

    def get(self, key: str, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if key in self.models:
            self.models[key] = self.models.pop(key)  # most recent last
            return self.models[key]
        while len(self.models) >= self.size:
            self.models.pop(next(iter(self.models)))
        self.models[key] = load()
        return self.models[key]


class Pipeline:
    def __init__(self, config: PipelineConfig, output_dir: str | Path, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.out = Path(output_dir).resolve()
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.cache = _ModelCache()
        self._references: dict[str, Any] = {}  # the KL reference log-probs of the last customer (and the base)
        self._eval_data = None
        self._tokenizer = None
        self.source = resolve_model(config.base)
        if not progress:
            _quiet_transformers()
        self.base_spec = self._checked_base()

    # --- paths -------------------------------------------------------------------------------------
    def adapter_dir(self, customer: str) -> Path:
        return self.out / "adapters" / customer

    def merged_dir(self, customer: str) -> Path:
        return self.out / "merged" / customer

    def artifact_dir(self, target: TargetSpec, customer: str | None = None) -> Path:
        return self.out / "artifacts" / (f"{customer}/{target.name}" if customer else target.name)

    def gguf_path(self, target: TargetSpec, customer: str) -> Path:
        return self.artifact_dir(target, customer) / f"{customer}-{target.type}.gguf"

    def eval_path(self, stage_id: str) -> Path:
        return self.out / "eval" / (stage_id.removeprefix("eval/").replace("/", "__") + ".json")

    # --- the double-rounding guard -----------------------------------------------------------------
    def _checked_base(self) -> str:
        if self.source.kind != "holdall":
            return self.config.base
        if not self.config.force:
            raise ConfigError(
                f"the base {self.config.base} is a holdall-quantized model. The pipeline merges each adapter into "
                "the base at full precision and quantizes the merged model once; starting from quantized weights "
                "would round every artifact twice. Point base at the original float model (hub id, HF directory or "
                ".gguf), or set force = true to dequantize this base once and accept the double rounding"
            )
        return str(self.out / "base-dequantized")

    # --- shared inputs -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            spec = self.config.base
            self._tokenizer = load_tokenizer(spec)
            if self._tokenizer is None:
                raise ConfigError(f"{spec} ships no tokenizer; the pipeline needs one to read the customers' data")
        return self._tokenizer

    @property
    def eval_data(self):
        if self._eval_data is None:
            from .evaluate import build_eval_data

            self._eval_data = build_eval_data(self.config, self.tokenizer)
        return self._eval_data

    def base_model(self) -> torch.nn.Module:
        return self.cache.get("base", lambda: load_model(self.base_spec, dtype=torch.float32)[0])

    def merged_model(self, customer: str) -> torch.nn.Module:
        return self.cache.get(f"merged/{customer}", lambda: load_model(self.merged_dir(customer), dtype=torch.float32)[0])

    def reference(self, key: str):
        """The KL reference scorer (``"base"`` or a customer's merged model), its window log-probs memoised."""
        from ..evaluation.scoring import TorchScorer
        from .evaluate import CachedScorer

        if key not in self._references:
            for old in [k for k in self._references if k != "base"]:
                del self._references[old]  # one customer's windows at a time: [windows x T x vocab] floats
            model = self.base_model() if key == "base" else self.merged_model(key)
            windows = {tuple(ids) for ids, _ in self.eval_data.text}
            self._references[key] = CachedScorer(TorchScorer(model, "base" if key == "base" else f"{key} merged"), windows)
        return self._references[key]

    # --- the plan ----------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.config
        base_in = {"base": cfg.base, "files": _file_stamps(self.source)}
        eval_in = {"eval": dataclasses.asdict(cfg.eval), "text": file_digest(cfg.eval.text_path()),
                   "split": [cfg.finetune.max_len, cfg.finetune.eval_fraction, cfg.finetune.seed],
                   "data": {c.name: file_digest(c.data) for c in cfg.customers}}
        stages: list[Stage] = []
        if self.source.kind == "holdall":
            stages.append(Stage("dequantize/base", self._dequantize_base, base_in))
        first = ("dequantize/base",) if self.source.kind == "holdall" else ()
        stages.append(Stage("eval/base", self._eval_base, [base_in, eval_in], first))
        ft_dict = {k: v for k, v in cfg.finetune.to_dict().items() if k != "progress"}
        for c in cfg.customers:
            n = c.name
            stages += [
                Stage(f"finetune/{n}", lambda c=c: self._finetune(c), [base_in, ft_dict, file_digest(c.data)], first),
                Stage(f"merge/{n}", lambda n=n: self._merge(n), cfg.merged_dtype, (f"finetune/{n}",)),
                Stage(f"eval/{n}/merged", lambda n=n: self._eval_merged(n), eval_in, (f"merge/{n}", "eval/base")),
            ]
            for t in cfg.targets:
                if not t.per_customer:
                    continue
                stages += [
                    Stage(f"build/{n}/{t.name}", lambda n=n, t=t: self._build(n, t), _target_inputs(t), (f"merge/{n}",)),
                    Stage(f"eval/{n}/{t.name}", lambda n=n, t=t: self._eval_target(n, t), eval_in,
                          (f"build/{n}/{t.name}", f"merge/{n}")),
                ]
        for t in cfg.targets:
            if t.per_customer:
                continue
            tuned = tuple(f"finetune/{c.name}" for c in cfg.customers)
            merged = tuple(f"merge/{c.name}" for c in cfg.customers)
            stages += [
                Stage(f"build/{t.name}", lambda t=t: self._build_adapters(t), [base_in, _target_inputs(t)], first + tuned),
                Stage(f"eval/{t.name}", lambda t=t: self._eval_adapters(t), eval_in, (f"build/{t.name}",) + merged),
            ]
        return stages

    # --- running -----------------------------------------------------------------------------------
    def run(self, restart: bool = False) -> PipelineResult:
        self.out.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out):
            state = PipelineState(self.out)
            if restart:
                state.forget()
            write_json(self.out / "pipeline_config.json", self.config.to_dict())
            stages = self.stages()
            result = PipelineResult(self.out, self.out / "report" / "report.md")
            fps: dict[str, str] = {}
            total = len(stages) + 1
            for i, stage in enumerate(stages, 1):
                fp = fingerprint(stage.id, stage.inputs, [fps[d] for d in stage.deps])
                fps[stage.id] = fp
                if state.is_done(stage.id, fp):
                    result.skipped.append(stage.id)
                    result.seconds[stage.id] = state.stages[stage.id].seconds
                    self.log(f"[{i}/{total}] {stage.id}: done earlier, skipped")
                    continue
                self.log(f"[{i}/{total}] {stage.id} ...")
                started = time.perf_counter()
                try:
                    outputs = stage.run()
                except KeyboardInterrupt:
                    self.log(f"interrupted in {stage.id}; run the same command again to resume from this stage")
                    raise
                seconds = time.perf_counter() - started
                state.record(stage.id, fp, seconds, outputs)
                result.ran.append(stage.id)
                result.seconds[stage.id] = seconds
                self.log(f"[{i}/{total}] {stage.id}: {seconds:.1f} s")
            self.log(f"[{total}/{total}] report ...")
            from .report import write_report

            write_report(self, state, [s.id for s in stages])
            return result

    # --- stages ------------------------------------------------------------------------------------
    def _dequantize_base(self) -> list[Path]:
        from ..algorithms import dequantize
        from ..models.loading import save_hf

        model, tokenizer = load_model(self.config.base)
        dequantize(model)
        return [save_hf(model, tokenizer, self.out / "base-dequantized", overwrite=True)]

    def _eval_base(self) -> list[Path]:
        from .evaluate import score_artifact

        model = self.base_model()
        scores = score_artifact(self.reference("base"), self.eval_data, progress=self.progress)
        from ..models.info import model_info

        size = model_info(model)["memory_bytes"]
        return self._write_eval("eval/base", {"kind": "base", "size_bytes": size,
                                              "size_note": "float32 parameters", **scores})

    def _finetune(self, customer) -> list[Path]:
        from ..training import finetune

        out = self.adapter_dir(customer.name)
        ft = self.config.finetune
        run_id = fingerprint(self.config.base, {k: v for k, v in ft.to_dict().items() if k != "progress"},
                             file_digest(customer.data))
        marker = out / "pipeline_run.json"
        resume = (out / "checkpoint" / "trainer_state.pt").is_file() and marker.is_file() \
            and json.loads(marker.read_text()).get("run") == run_id
        if resume:
            self.log(f"  resuming {customer.name}'s fine-tune from its last checkpoint")
        elif out.exists():
            shutil.rmtree(out)  # another run's (or a changed setting's) leftovers
        out.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"run": run_id})
        config = dataclasses.replace(ft, progress=self.progress, save_every=ft.save_every or 20)
        result = finetune(self.base_spec, customer.data, config, out, resume=resume)
        write_json(out / "train_summary.json", {
            "steps": result.steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss,
            "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "trainable": result.trainable,
            "data": str(customer.data), "method": ft.method, "r": ft.r, "alpha": ft.alpha,
        })
        return [out / name for name in ADAPTER_FILES]

    def _merge(self, customer: str) -> list[Path]:
        from ..training import merge

        self.cache.models.pop(f"merged/{customer}", None)
        self._references.pop(customer, None)
        merged = merge(self.base_spec, self.adapter_dir(customer), self.merged_dir(customer),
                       dtype=_DTYPES[self.config.merged_dtype], overwrite=True)
        return [merged]

    def _eval_merged(self, customer: str) -> list[Path]:
        from .evaluate import score_artifact

        scores = score_artifact(self.reference(customer), self.eval_data, self.reference("base"), progress=self.progress)
        return self._write_eval(f"eval/{customer}/merged", {
            "kind": "merged", "customer": customer, "reference": "base",
            "size_bytes": _dir_bytes(self.merged_dir(customer)), "path": str(self.merged_dir(customer)), **scores,
        })

    def _build(self, customer: str, target: TargetSpec) -> list[Path]:
        from ..evaluation.text import load_text

        merged = self.merged_dir(customer)
        if target.kind == "gguf":
            from ..formats.gguf.export import export_gguf

            text = load_text(target.calibration_text_path()) if target.calibrate else None
            self.artifact_dir(target, customer).mkdir(parents=True, exist_ok=True)
            return [export_gguf(merged, self.gguf_path(target, customer), target.type,
                                calibration_text=text, progress=self.progress)]
        from ..algorithms import quantize, select_layers
        from ..formats import check_exportable, export_checkpoint

        model, tokenizer = load_model(merged, dtype=torch.float32)
        config = target.quant_config()
        # a format that cannot hold this scheme/shape fails here, before a long calibration
        check_exportable(model, select_layers(model, config), config.scheme, target.format)
        quantize(model, config, progress=self.progress, tokenizer=tokenizer)
        return [export_checkpoint(model, self.artifact_dir(target, customer), target.format, tokenizer, overwrite=True)]

    def _scorer_for(self, target: TargetSpec, customer: str):
        from ..evaluation.scoring import LlamaCppScorer, TorchScorer

        name = f"{customer} {target.name}"
        if target.kind == "gguf":
            path = self.gguf_path(target, customer)
            if _use_llamacpp(self.config.eval.engine):
                n_ctx = max(self.config.eval.seq_len, self.config.finetune.max_len)
                return LlamaCppScorer(path, n_ctx=n_ctx, threads=torch.get_num_threads(), name=name), "llama.cpp"
            return TorchScorer(load_model(path, dtype=torch.float32)[0], name), "torch (dequantized GGUF)"
        return TorchScorer(load_model(self.artifact_dir(target, customer))[0], name), "torch"

    def _eval_target(self, customer: str, target: TargetSpec) -> list[Path]:
        from .evaluate import score_artifact

        scorer, engine = self._scorer_for(target, customer)
        scores = score_artifact(scorer, self.eval_data, self.reference(customer), [customer], self.progress)
        path = self.gguf_path(target, customer) if target.kind == "gguf" else self.artifact_dir(target, customer)
        size = path.stat().st_size if path.is_file() else _dir_bytes(path)
        return self._write_eval(f"eval/{customer}/{target.name}", {
            "kind": target.kind, "customer": customer, "target": target.name, "describe": target.describe(),
            "reference": f"{customer} merged", "engine": engine, "size_bytes": size, "path": str(path), **scores,
        })

    def _build_adapters(self, target: TargetSpec) -> list[Path]:
        from ..models.loading import save_hf

        out = self.artifact_dir(target)
        with atomic_dir(out, overwrite=True) as tmp:
            model, tokenizer = load_model(self.base_spec, dtype=torch.float32)
            if target.base == "float":
                save_hf(model, tokenizer, tmp / "base")
            else:
                from ..algorithms import quantize
                from ..models.checkpoint import save_quantized

                quantize(model, _served_quant_config(target), progress=self.progress)
                save_quantized(model, tokenizer, tmp / "base")
            for c in self.config.customers:
                dest = tmp / "adapters" / c.name
                dest.mkdir(parents=True)
                for name in ADAPTER_FILES:
                    shutil.copy2(self.adapter_dir(c.name) / name, dest / name)
        return [out / "base", *(out / "adapters" / c.name for c in self.config.customers)]

    def _eval_adapters(self, target: TargetSpec) -> list[Path]:
        from ..evaluation.scoring import TorchScorer
        from ..tuners.lora import load_adapter, set_adapter
        from .evaluate import score_artifact

        out = self.artifact_dir(target)
        model, _ = load_model(out / "base", dtype=torch.float32)
        for c in self.config.customers:
            load_adapter(model, out / "adapters" / c.name, name=c.name)
        base_bytes = _dir_bytes(out / "base")
        per_customer = {}
        for c in self.config.customers:
            set_adapter(model, c.name)
            scores = score_artifact(TorchScorer(model, f"{c.name} on {target.name}"), self.eval_data,
                                    self.reference(c.name), [c.name], self.progress)
            per_customer[c.name] = {"adapter_bytes": _dir_bytes(out / "adapters" / c.name), **scores}
        return self._write_eval(f"eval/{target.name}", {
            "kind": "adapters", "target": target.name, "describe": target.describe(), "path": str(out),
            "reference": "each customer's merged model", "engine": "torch", "base_bytes": base_bytes,
            "size_bytes": _dir_bytes(out), "per_customer": per_customer,
        })

    def _write_eval(self, stage_id: str, record: dict) -> list[Path]:
        path = self.eval_path(stage_id)
        write_json(path, record)
        return [path]


def run_pipeline(config: PipelineConfig, output_dir: str | Path, *, restart: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> PipelineResult:
    """Run (or resume) the whole pipeline described by ``config`` into ``output_dir``; see the module docstring."""
    if not isinstance(config, PipelineConfig):
        raise ConfigError(f"run_pipeline needs a PipelineConfig (see load_pipeline_config), got {type(config).__name__}")
    return Pipeline(config, output_dir, progress=progress, log=log).run(restart=restart)


def _served_quant_config(target: TargetSpec):
    if target.base == "nf4":
        from ..training.qlora import qlora_quant_config

        return qlora_quant_config()  # exactly the NF4 + double-quant storage QLoRA trained the adapters on
    return target.quant_config()


def _target_inputs(target: TargetSpec) -> dict:
    inputs = dataclasses.asdict(target)
    calib = target.calibration_text_path()
    if calib is not None:
        inputs["calibration_digest"] = file_digest(calib)
    return inputs


def _file_stamps(source) -> list:
    """Size and mtime of a local base's files: cheap to read, and a replaced base file changes them."""
    try:
        return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in source.files()]
    except OSError:
        return []


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _use_llamacpp(engine: str) -> bool:
    if engine == "torch":
        return False
    if engine == "llamacpp":
        return True
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

