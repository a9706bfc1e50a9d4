"""Fine-tuning: LoRA / QLoRA preparation, 8-bit and paged AdamW, JSONL/text data, a resumable trainer.

    from holdall.training import FinetuneConfig, finetune, merge
    result = finetune("smollm2", "data.jsonl", FinetuneConfig(method="qlora", max_steps=100), "out/adapter")
    merge("smollm2", "out/adapter", "out/merged")
"""

from holdall.training.data import Datasets, Example, build_datasets, collate, pack
from holdall.training.finetune import FinetuneConfig, FinetuneResult, finetune, merge
from holdall.training.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer, state_bytes
from holdall.training.qlora import enable_gradient_checkpointing, prepare_model, quantize_for_qlora
from holdall.training.trainer import Trainer, TrainerConfig, TrainingDivergedError, TrainResult

__all__ = [
    "AdamW8bit",
    "Datasets",
    "Example",
    "FinetuneConfig",
    "FinetuneResult",
    "PagedAdamW",
    "PagedAdamW8bit",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainingDivergedError",
    "build_datasets",
    "build_optimizer",
    "collate",
    "enable_gradient_checkpointing",
    "finetune",
    "merge",
    "pack",
    "prepare_model",
    "quantize_for_qlora",
    "state_bytes",
]
