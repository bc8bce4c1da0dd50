"""Fixtures for model tests: the tiny Llama loaded, with and without a LoRA adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedsilo.model import DEFAULT_TARGET_MODULES, attach_lora, load_base_model


@pytest.fixture
def make_lora(tiny_model_dir: Path) -> Callable[[int], PeftModel]:
    """Loads a fresh tiny model with a rank-4 adapter on every projection."""

    def build(init_seed: int) -> PeftModel:
        base, _ = load_base_model(tiny_model_dir)
        return attach_lora(
            base,
            rank=4,
            alpha=8.0,
            dropout=0.0,
            target_modules=DEFAULT_TARGET_MODULES,
            init_seed=init_seed,
        )

    return build


@pytest.fixture
def lora_model(make_lora: Callable[[int], PeftModel]) -> PeftModel:
    return make_lora(0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    _, tokenizer = load_base_model(tiny_model_dir)
    return tokenizer


@pytest.fixture
def prompt_ids(tiny_tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids: torch.Tensor = tiny_tokenizer("Patient reports chest pain.", return_tensors="pt")[
        "input_ids"
    ]
    return ids
