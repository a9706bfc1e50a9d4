"""``holdall pipeline``: one base, several customers — fine-tune, merge at full precision, quantize once per
deployment target, evaluate every artifact against the base, report. Resumable stage by stage.

    from holdall.pipeline import load_pipeline_config, run_pipeline
    result = run_pipeline(load_pipeline_config("pipeline.toml"), "out/run")
    print(result.report_path)
"""

from holdall.pipeline.config import (
    CustomerSpec,
    EvalSpec,
    PipelineConfig,
    TargetSpec,
    demo_config_path,
    load_pipeline_config,
    parse_target,
)
from holdall.pipeline.run import PipelineResult, run_pipeline

__all__ = [
    "CustomerSpec",
    "EvalSpec",
    "PipelineConfig",
    "PipelineResult",
    "TargetSpec",
    "demo_config_path",
    "load_pipeline_config",
    "parse_target",
    "run_pipeline",
]
