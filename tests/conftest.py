"""Shared fixtures: a tiny random Llama on disk and small run configurations."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.model.tiny import write_tiny_llama

torch.set_num_threads(1)
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Llama folder (byte-level tokenizer, chat template), shared by tests."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def small_config(model_dir: Path, **overrides: dict[str, Any]) -> FedsiloConfig:
    """A small, fast run config on the model in ``model_dir``; sections can be overridden.

    A plain function as well as the ``make_config`` fixture, for module-scoped fixtures.
    """
    base: dict[str, Any] = {
        "run": {
            "name": "test",
            "seed": 0,
            "rounds": 2,
            "torch_threads": 1,
            "require_site_policies": False,
        },
        "model": {"base": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8.0},
        "task": {
            "name": "icd10",
            "num_sites": 3,
            "examples_per_site": 8,
            "gold_size": 6,
            "system_prompt": "Code it.",
        },
        # fp32 unless a test asks for bf16: the same numbers on every CPU. Eager unless a test
        # asks for compilation, which costs seconds per model.
        "train": {
            "local_steps": 2,
            "batch_size": 2,
            "learning_rate": 0.01,
            "max_length": 96,
            "precision": "fp32",
            "compile": "off",
        },
        "strategy": {"name": "fedavg", "min_sites": 2},
        "evaluation": {"max_new_tokens": 4, "batch_size": 8},
    }
    return parse_config(_merge(base, overrides), source="test config")


@pytest.fixture
def make_config(tiny_model_dir: Path) -> Callable[..., FedsiloConfig]:
    """Build a small, fast run config on the tiny model; sections can be overridden."""

    def build(**overrides: dict[str, Any]) -> FedsiloConfig:
        return small_config(tiny_model_dir, **overrides)

    return build
