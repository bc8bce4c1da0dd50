"""The experts a master is distilled from: PEFT adapter folders on one base model.

An experts folder (RUN/experts of a clustered run, or any folder) holds one subfolder per
expert with ``adapter_config.json`` and ``adapter_model.safetensors``, and optionally
``expert.json`` (its sites, system prompt and base model hash, written by a clustered run).
All experts must be LoRA adapters of the same shape on the same base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.crypto import sha256_hex
from fedsilo.model.adapters import AdapterState, adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.server.federation import adapter_digest

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPERT_INFO = "expert.json"
# LoRA settings that must agree between experts (and that the student copies).
SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "peft_type")


@dataclass(frozen=True)
class Expert:
    """One expert adapter as read from its folder."""

    name: str
    folder: Path
    state: AdapterState
    peft_sha256: str  # sha256 of adapter_model.safetensors, the file as it is on disk
    adapter_sha256: str  # sha256 of the tensors in fedsilo's canonical form (as ledgers record)
    settings: dict[str, Any]  # adapter_config.json
    info: dict[str, Any]  # expert.json, or {} without one

    @property
    def base_model_path(self) -> str:
        return str(self.settings.get("base_model_name_or_path"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: cannot read: {error}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def load_expert(folder: Path) -> Expert:
    """Read one expert folder; ModelError naming the file when it is not a LoRA adapter."""
    folder = Path(folder)
    settings = _read_json(folder / PEFT_CONFIG)
    if settings.get("peft_type") != "LORA":
        raise ModelError(
            f"{folder / PEFT_CONFIG}: not a LoRA adapter ({settings.get('peft_type')})"
        )
    try:
        data = (folder / PEFT_WEIGHTS).read_bytes()
    except OSError as error:
        raise ModelError(f"{folder / PEFT_WEIGHTS}: cannot read: {error}") from None
    state = adapter_from_bytes(data)
    info = _read_json(folder / EXPERT_INFO) if (folder / EXPERT_INFO).exists() else {}
    return Expert(
        name=folder.name,
        folder=folder,
        state=state,
        peft_sha256=sha256_hex(data),
        adapter_sha256=adapter_digest(state),
        settings=settings,
        info=info,
    )


def load_experts(folder: Path) -> list[Expert]:
    """Every expert in ``folder``, sorted by name; ModelError if none, or if they disagree."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no experts folder there")
    experts = [load_expert(sub) for sub in sorted(folder.iterdir()) if (sub / PEFT_CONFIG).exists()]
    if not experts:
        raise ModelError(f"{folder}: no expert adapter (a subfolder with {PEFT_CONFIG})")
    first = experts[0]
    for expert in experts[1:]:
        for key in SHAPE_KEYS:
            if _normal(expert.settings.get(key)) != _normal(first.settings.get(key)):
                raise ModelError(
                    f"expert {expert.name!r} has {key}={expert.settings.get(key)!r} but "
                    f"{first.name!r} has {first.settings.get(key)!r}; experts must share one "
                    "LoRA shape"
                )
        if expert.state.keys() != first.state.keys():
            raise ModelError(f"expert {expert.name!r} has other LoRA tensors than {first.name!r}")
        ours, theirs = expert.info.get("base_model_hash"), first.info.get("base_model_hash")
        if ours and theirs and ours != theirs:
            raise ModelError(
                f"expert {expert.name!r} was trained on base model {ours}, "
                f"{first.name!r} on {theirs}"
            )
    return experts


def _normal(value: object) -> object:
    return sorted(value) if isinstance(value, list) else value
