"""Base models and LoRA adapters: resolving, loading, fingerprinting, (de)serializing."""

from fedsilo.config import DEFAULT_TARGET_MODULES
from fedsilo.model.adapters import (
    AdapterState,
    adapter_from_bytes,
    adapter_to_bytes,
    attach_lora,
    export_peft_folder,
    get_adapter_state,
    load_adapter,
    save_adapter,
    set_adapter_state,
)
from fedsilo.model.base import (
    DEFAULT_BASE_MODEL,
    ModelError,
    base_model_hash,
    cache_root,
    load_base_model,
    resolve_base_model,
)
from fedsilo.model.tiny import write_tiny_llama

__all__ = [
    "DEFAULT_BASE_MODEL",
    "DEFAULT_TARGET_MODULES",
    "AdapterState",
    "ModelError",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "attach_lora",
    "base_model_hash",
    "cache_root",
    "export_peft_folder",
    "get_adapter_state",
    "load_adapter",
    "load_base_model",
    "resolve_base_model",
    "save_adapter",
    "set_adapter_state",
    "write_tiny_llama",
]
