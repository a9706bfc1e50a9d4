"""LoRA: low-rank adapters on float or quantized linears, several per model, saved in PEFT's format.

    from holdall.tuners.lora import LoraConfig, add_lora, save_adapter, load_adapter, trainable_report
    add_lora(model, LoraConfig(r=16, alpha=32, targets=("q_proj", "v_proj")))
    print(trainable_report(model))
"""

from holdall.tuners.lora.config import LoraConfig
from holdall.tuners.lora.layer import LoraLinear, ModulesToSave
from holdall.tuners.lora.model import (
    LoraState,
    active_adapters,
    adapter_rows,
    add_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    mark_trainable,
    merge_adapters,
    merge_lora,
    select_targets,
    set_adapter,
    trainable_report,
    unmerge_adapters,
)
from holdall.tuners.lora.peft_format import (
    base_fingerprint,
    describe_base,
    load_adapter,
    peft_config_dict,
    save_adapter,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "LoraState",
    "ModulesToSave",
    "active_adapters",
    "adapter_rows",
    "add_lora",
    "base_fingerprint",
    "count_parameters",
    "delete_adapter",
    "describe_base",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "mark_trainable",
    "merge_adapters",
    "merge_lora",
    "peft_config_dict",
    "save_adapter",
    "select_targets",
    "set_adapter",
    "trainable_report",
    "unmerge_adapters",
]
