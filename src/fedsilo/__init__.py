"""fedsilo: federated LoRA fine-tuning of language models across data silos."""

__version__ = "0.1.0"
