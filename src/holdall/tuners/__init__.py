"""Parameter-efficient tuners that wrap a (possibly quantized) model in place. Today: LoRA (``holdall.tuners.lora``)."""

from holdall.tuners.lora import (
    LoraConfig,
    adapter_rows,
    add_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_lora,
    save_adapter,
    set_adapter,
    trainable_report,
)

__all__ = [
    "LoraConfig",
    "adapter_rows",
    "add_lora",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "set_adapter",
    "trainable_report",
]
