"""fedsilo: federated LoRA fine-tuning of language models across data silos."""

import os

# A hospital tool does not phone home: Flower's telemetry and update check, and any hub
# download, are off unless the operator explicitly turns them back on.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
