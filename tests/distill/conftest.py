"""Experts for distillation tests: random LoRA adapters on the tiny model, as PEFT folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsilo.distill.transfer import TransferRecord, write_transfer
from fedsilo.model.adapters import attach_lora, export_peft_folder, get_adapter_state
from fedsilo.model.base import load_base_model

EXPERTS = ("cardio", "endo")


def write_random_experts(base_dir: Path, out: Path, *, scale: float = 1.0) -> Path:
    """One PEFT folder per name in EXPERTS, each with its own random (non-zero) LoRA B."""
    base, _ = load_base_model(base_dir)
    model = attach_lora(
        base,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_seed=0,
    )
    for index, name in enumerate(EXPERTS):
        generator = torch.Generator().manual_seed(100 + index)
        state = {
            key: torch.randn(value.shape, generator=generator) * scale if "lora_B" in key else value
            for key, value in get_adapter_state(model).items()
        }
        export_peft_folder(model, state, out / name, base_model_path=str(base_dir))
    return out


def transfer_records() -> list[TransferRecord]:
    """Four public-looking records per expert, each labelled with its expert."""
    return [
        TransferRecord(f"ICD-10-CM code for: {topic} {n}", f"{letter}{n:02d}.{n}", expert)
        for expert, topic, letter in (("cardio", "heart", "I"), ("endo", "gland", "E"))
        for n in range(4)
    ]


@pytest.fixture
def experts_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return write_random_experts(tiny_model_dir, tmp_path / "experts")


@pytest.fixture
def transfer_file(tmp_path: Path) -> Path:
    path = tmp_path / "transfer.jsonl"
    write_transfer(transfer_records(), path)
    return path
