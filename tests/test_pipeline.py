"""holdall pipeline on a tiny Llama: every stage, the report, resume after a crash or an interrupted fine-tune,
config changes, the double-rounding guard, config files and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from holdall.errors import ConfigError
from holdall.pipeline import (
    CustomerSpec,
    EvalSpec,
    PipelineConfig,
    TargetSpec,
    load_pipeline_config,
    parse_target,
    run_pipeline,
)
from holdall.pipeline.run import Pipeline
from holdall.training import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STYLES = {"alpha": "Answer: the red fox runs", "beta": "Summary: a blue river flows"}


def _write_customers(root: Path) -> dict[str, Path]:
    files = {}
    for name, style in STYLES.items():
        path = root / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(40):
                f.write(json.dumps({"instruction": f"question number {i} about {name}", "output": f"{style} {i}."}) + "\n")
        files[name] = path
    return files


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama with a SentencePiece-style BPE tokenizer (GGUF export needs a real vocabulary) + 2 customers."""
    pytest.importorskip("sentencepiece")
    from gguf_helpers import hf_tokenizer_from_spm, tiny_llama, train_spm

    root = tmp_path_factory.mktemp("pipeline")
    tok = hf_tokenizer_from_spm(train_spm(root))
    model = tiny_llama(hidden=64, layers=2, vocab=1000, heads=4, kv_heads=2, intermediate=128)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root, _write_customers(root)


def _config(root: Path, files: dict[str, Path], targets=None, **ft) -> PipelineConfig:
    finetune = dict(method="qlora", r=4, alpha=8, dropout=0.0, lr=1e-2, max_steps=12, max_len=48,
                    eval_fraction=0.2, warmup=0, progress=False)
    finetune.update(ft)
    if targets is None:
        targets = (TargetSpec(kind="gguf", type="Q8_0"), TargetSpec(kind="quantize", method="rtn", bits=4, group_size=32),
                   TargetSpec(kind="quantize", method="rtn", bits=4, group_size=32, format="compressed-tensors"),
                   TargetSpec(kind="adapters", base="nf4"))
    return PipelineConfig(
        base=str(root / "base"),
        customers=tuple(CustomerSpec(name, path) for name, path in files.items()),
        finetune=FinetuneConfig(**finetune), targets=tuple(targets), eval=EvalSpec(seq_len=64, max_windows=2),
    )


@pytest.fixture(scope="module")
def full_run(workspace):
    root, files = workspace
    config = _config(root, files)
    return config, run_pipeline(config, root / "run", progress=False, log=lambda msg: None)


def _eval(result, name: str) -> dict:
    return json.loads((result.output_dir / "eval" / f"{name}.json").read_text())


def test_every_stage_runs_and_the_report_shows_each_customer_specialised(full_run):
    config, result = full_run
    assert not result.skipped
    expected = {"eval/base"}
    for c in ("alpha", "beta"):
        expected |= {f"finetune/{c}", f"merge/{c}", f"eval/{c}/merged"}
        expected |= {f"{kind}/{c}/{t}" for kind in ("build", "eval")
                     for t in ("gguf-q8_0", "rtn-w4g32", "rtn-w4g32-compressed-tensors")}
    expected |= {"build/adapters-nf4", "eval/adapters-nf4"}
    assert set(result.ran) == expected
    base = _eval(result, "base")
    for c in ("alpha", "beta"):
        other = "beta" if c == "alpha" else "alpha"
        merged = _eval(result, f"{c}__merged")
        # the adapter learned its customer's style: its own records improve, the other customer's do not improve more
        own_gain = base["heldout"][c]["nll"] - merged["heldout"][c]["nll"]
        other_gain = base["heldout"][other]["nll"] - merged["heldout"][other]["nll"]
        assert own_gain > 0.3 and own_gain > other_gain + 0.3
    report = result.report_path.read_text()
    assert "own adapter best: yes" in report and "**no**" not in report
    for name in ("gguf-q8_0", "rtn-w4g32", "adapters-nf4", "Wall time per stage"):
        assert name in report
    assert (result.output_dir / "report" / "quality_vs_size.png").stat().st_size > 1000
    assert (result.output_dir / "report" / "heldout_matrix.png").stat().st_size > 1000


def test_artifacts_are_real_and_their_scores_agree_with_independent_loads(full_run):
    from holdall.models.loading import load_model
    from holdall.tuners.lora import load_adapter

    config, result = full_run
    out = result.output_dir
    gguf = out / "artifacts" / "alpha" / "gguf-q8_0" / "alpha-Q8_0.gguf"
    rec = _eval(result, "alpha__gguf-q8_0")
    assert rec["size_bytes"] == gguf.stat().st_size and gguf.read_bytes()[:4] == b"GGUF"
    # Q8_0 barely moves a model: the artifact scores like its float merged model
    merged = _eval(result, "alpha__merged")
    assert abs(rec["heldout"]["alpha"]["nll"] - merged["heldout"]["alpha"]["nll"]) < 0.01
    assert rec["text"]["kld_mean"] < 1e-3
    # the int4 directory is a holdall checkpoint: every decoder linear is packed
    model, _ = load_model(out / "artifacts" / "alpha" / "rtn-w4g32")
    assert len(model.holdall_quant["layers"]) == 2 * 7
    # the same codes written as llm-compressor's compressed-tensors layout read back to the same scores
    ct = _eval(result, "alpha__rtn-w4g32-compressed-tensors")
    holdall_fmt = _eval(result, "alpha__rtn-w4g32")
    assert json.loads((Path(ct["path"]) / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    assert ct["heldout"]["alpha"]["nll"] == pytest.approx(holdall_fmt["heldout"]["alpha"]["nll"], abs=1e-5)
    # merged = base + adapter at full precision (independent of the pipeline's eval code: plain forward passes)
    base, _ = load_model(config.base)
    load_adapter(base, out / "adapters" / "alpha")
    merged_model, _ = load_model(out / "merged" / "alpha")
    ids = torch.randint(3, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)
    # one served base for both customers, each adapter with its own scores, model cards beside the artifacts
    served = _eval(result, "adapters-nf4")
    assert set(served["per_customer"]) == {"alpha", "beta"}
    assert (out / "artifacts" / "adapters-nf4" / "README.md").read_text().startswith("---\nbase_model:")
    assert "GGUF Q8_0" in (gguf.parent / "README.md").read_text()


def test_rerun_skips_everything_and_a_new_target_reuses_the_adapters(workspace, full_run):
    root, files = workspace
    config, first = full_run
    again = run_pipeline(config, root / "run", progress=False, log=lambda msg: None)
    assert again.ran == [] and set(again.skipped) == set(first.ran)
    more = _config(root, files, targets=config.targets + (TargetSpec(kind="gguf", type="Q4_0"),))
    grown = run_pipeline(more, root / "run", progress=False, log=lambda msg: None)
    assert set(grown.ran) == {f"{k}/{c}/gguf-q4_0" for k in ("build", "eval") for c in ("alpha", "beta")}


def test_a_crash_resumes_at_the_failed_stage(workspace, monkeypatch):
    root, files = workspace
    config = _config(root, files, targets=(TargetSpec(kind="quantize", method="rtn", bits=4, group_size=32),))
    calls = []
    original = Pipeline._build

    def failing_build(self, customer, target):
        calls.append(customer)
        if customer == "beta":
            raise RuntimeError("disk full")
        return original(self, customer, target)

    monkeypatch.setattr(Pipeline, "_build", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        run_pipeline(config, root / "crash", progress=False, log=lambda msg: None)
    monkeypatch.setattr(Pipeline, "_build", original)
    resumed = run_pipeline(config, root / "crash", progress=False, log=lambda msg: None)
    assert resumed.ran == ["build/beta/rtn-w4g32", "eval/beta/rtn-w4g32"]
    assert "finetune/alpha" in resumed.skipped and "finetune/beta" in resumed.skipped


def test_an_interrupted_finetune_continues_from_its_checkpoint(workspace, full_run, monkeypatch):
    """Ctrl-C after step 7 (checkpoint at 5): the rerun resumes at step 5 and ends with the same adapter as the
    uninterrupted run."""
    from safetensors.torch import load_file

    from holdall.training.trainer import Trainer

    root, files = workspace
    config = _config(root, files, targets=(), save_every=5)
    original = Trainer._train_step

    def interrupting(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, root / "ctrl-c", progress=False, log=lambda msg: None)
    monkeypatch.setattr(Trainer, "_train_step", original)
    messages = []
    run_pipeline(config, root / "ctrl-c", progress=False, log=messages.append)
    assert any("resuming alpha's fine-tune" in m for m in messages)
    steps = [json.loads(line)["step"] for line in (root / "ctrl-c" / "adapters" / "alpha" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 13))
    resumed = load_file(root / "ctrl-c" / "adapters" / "alpha" / "adapter_model.safetensors")
    straight = load_file(full_run[1].output_dir / "adapters" / "alpha" / "adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5)


def test_a_quantized_base_is_refused_unless_forced(workspace, tmp_path):
    import holdall

    root, files = workspace
    model, tok = holdall.load_model(root / "base")
    holdall.quantize(model, holdall.QuantConfig.for_method("rtn", bits=4, group_size=32))
    holdall.save_quantized(model, tok, tmp_path / "int4")
    config = _config(root, files, targets=())
    quantized = PipelineConfig(**{**config.__dict__, "base": str(tmp_path / "int4")})
    with pytest.raises(ConfigError, match="round every artifact twice"):
        run_pipeline(quantized, tmp_path / "run", progress=False, log=lambda msg: None)
    forced = PipelineConfig(**{**quantized.__dict__, "force": True,
                               "customers": quantized.customers[:1], "finetune": FinetuneConfig(
                                   method="lora", r=2, max_steps=2, max_len=48, eval_fraction=0.2, progress=False)})
    result = run_pipeline(forced, tmp_path / "run", progress=False, log=lambda msg: None)
    assert result.ran[0] == "dequantize/base"
    assert "rounded a second time" in result.report_path.read_text()


def test_a_second_run_on_the_same_directory_is_refused(workspace, tmp_path):
    root, files = workspace
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".pipeline.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ConfigError, match="another holdall pipeline"):
        run_pipeline(_config(root, files, targets=()), tmp_path / "busy", progress=False, log=lambda msg: None)


def test_config_file_relative_paths_and_errors(workspace, tmp_path):
    root, files = workspace
    (tmp_path / "data").mkdir()
    for name, path in files.items():
        (tmp_path / "data" / path.name).write_bytes(path.read_bytes())
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
base = "{root / 'base'}"
[finetune]
method = "lora"
max_steps = 3
eval_fraction = 0.2
targets = ["q_proj", "v_proj"]
[[customers]]
name = "alpha"
data = "data/alpha.jsonl"
[[targets]]
kind = "gguf"
type = "q4_k_m"
calibrate = "wikitext2"
[eval]
max_windows = 2
""")
    config = load_pipeline_config(toml)
    assert config.customers[0].data == (tmp_path / "data" / "alpha.jsonl").resolve()
    assert config.targets[0].type == "Q4_K_M" and config.targets[0].name == "gguf-q4_k_m-imatrix"
    assert config.finetune.targets == ("q_proj", "v_proj") and config.eval.max_windows == 2

    toml.write_text(toml.read_text().replace("max_steps = 3", "max_step = 3"))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_step'\]"):
        load_pipeline_config(toml)
    toml.write_text("base = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline_config(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("spec, expected", [
    ("gguf:Q4_K_M", dict(kind="gguf", type="Q4_K_M", name="gguf-q4_k_m")),
    ("gguf:q5_k_s:imatrix", dict(kind="gguf", type="Q5_K_S", calibrate="wikitext2")),
    ("rtn:w4g128", dict(kind="quantize", method="rtn", bits=4, group_size=128, name="rtn-w4g128")),
    ("gptq:w3g64", dict(kind="quantize", method="gptq", bits=3, group_size=64, calibrate="wikitext2")),
    ("nf4", dict(kind="quantize", method="nf4", name="nf4-w4g64", format="holdall")),
    ("gptq:w4g64:gptq", dict(kind="quantize", method="gptq", format="gptq", name="gptq-w4g64-gptq")),
    ("adapters:float", dict(kind="adapters", base="float", name="adapters-float")),
])
def test_target_shorthand(spec, expected):
    target = parse_target(spec)
    for key, value in expected.items():
        assert getattr(target, key) == value


@pytest.mark.parametrize("make, message", [
    (lambda: parse_target("gguf:Q9_Z"), "unknown GGUF file type"),
    (lambda: parse_target("rtn:4bits"), "wBITS"),
    (lambda: parse_target("magic"), "unknown quantization method"),
    (lambda: TargetSpec(kind="gguf", type="Q8_0", bits=4), "does not take bits"),
    (lambda: TargetSpec(kind="quantize", method="rtn", calibrate="wikitext2"), "calibration-free"),
    (lambda: TargetSpec(kind="adapters", base="fp8"), "base must be one of"),
    (lambda: parse_target("rtn:w4g64:exl2"), "unknown checkpoint format"),
    (lambda: CustomerSpec("a/b", Path("x.jsonl")), "becomes a directory name"),
])
def test_bad_targets_and_names_are_clear_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_config_level_checks(workspace):
    root, files = workspace
    config = _config(root, files, targets=())
    with pytest.raises(ConfigError, match="eval_fraction must be > 0"):
        PipelineConfig(**{**config.__dict__, "finetune": FinetuneConfig(eval_fraction=0.0)})
    with pytest.raises(ConfigError, match="two customers are named"):
        PipelineConfig(**{**config.__dict__, "customers": config.customers[:1] * 2})
    with pytest.raises(ConfigError, match="at least one"):
        PipelineConfig(**{**config.__dict__, "customers": ()})


def test_cli_pipeline(workspace, tmp_path, capsys):
    from holdall.cli.main import main

    root, files = workspace
    out = tmp_path / "cli-run"
    code = main(["pipeline", "--base", str(root / "base"), "--customer", f"alpha={files['alpha']}",
                 "--target", "rtn:w4g32", "--method", "lora", "--max-steps", "2", "-o", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.md'}" in printed
    saved = json.loads((out / "pipeline_config.json").read_text())
    assert saved["finetune"]["method"] == "lora" and saved["finetune"]["max_steps"] == 2
    assert saved["targets"][0]["name"] == "rtn-w4g32"
    assert main(["pipeline", "--customer", "alpha"]) == 2
    assert "needs a CONFIG file" in capsys.readouterr().err


def test_demo_config_is_valid_and_ships_with_the_data():
    from holdall.pipeline import demo_config_path

    config = load_pipeline_config(demo_config_path())
    assert config.base == "smollm2" and len(config.customers) == 3
    assert all(c.data.is_file() for c in config.customers)
    assert {t.kind for t in config.targets} == {"gguf", "quantize", "adapters"}
