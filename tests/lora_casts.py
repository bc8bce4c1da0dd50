"""Watching whether peft's LoRA layers cast their input, and bringing the casts back."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from fedsilo.training import precision


def record_lora_input_casts(model: nn.Module) -> list[bool]:
    """A list that gets, at every LoRA layer's forward, whether that layer casts its input."""
    casting: list[bool] = []
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.register_forward_pre_hook(
                lambda module, _args: casting.append(module.cast_input_dtype_enabled)
            )
    return casting


def keep_lora_input_casts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``forward_in`` leave peft's input casts on (the behaviour before it)."""
    monkeypatch.setattr(
        precision, "disable_input_dtype_casting", lambda *_args, **_kwargs: nullcontext()
    )
