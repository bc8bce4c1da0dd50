"""Local training through ``torch.compile``, where this machine can compile.

Eager PyTorch runs a LoRA decoder layer as dozens of small kernels: the rank-r products and the
``* scaling`` and ``+`` that peft adds to every adapted projection, RMSNorm, rotary embedding,
SiLU, the residual adds and the casts of autocast, each a pass over memory. The inductor
compiler fuses them into a few loops around the large matrix multiplies, and keeps bf16
intermediates in fp32 inside its fused loops (closer to fp32 training than eager bf16). Each
decoder layer is compiled on its own with dynamic shapes: every layer runs the same graph, so
one compilation serves all of them and every batch length.

Local training runs compiled (FedAvg, FedProx, FFA-LoRA, and record-level DP-SGD, whose
per-example gradients come from per-example weight copies inside the graph, see
:mod:`fedsilo.model.lora_forward`), and only inside :func:`compiled_training`: evaluation and
generation stay eager (the KV cache recompiles at every decoding length and gains nothing).
Inductor on the CPU needs a C++ compiler; "auto" compiles only where a probe compilation
succeeds at start-up, and logs why not otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from fedsilo.config.schema import CompileSetting, DeviceSetting
from fedsilo.training.loss import decoder_and_head

log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """``compile = "on"`` on a machine where torch.compile does not work."""


@dataclass(frozen=True)
class CompileChoice:
    """Whether local training runs compiled in this process, and why."""

    enabled: bool
    setting: CompileSetting
    reason: str  # why it is on or off (the probe's error where it failed)
    probe_seconds: float | None  # how long the probe compilation took (None: no probe)

    def describe(self) -> str:
        """One line for the log."""
        state = "compiled (torch.compile, inductor)" if self.enabled else "eager"
        return f"local training {state} (setting {self.setting!r}: {self.reason})"

    def as_record(self) -> dict[str, str | float | bool | None]:
        """The choice as JSON-ready values (run.json)."""
        return {
            "enabled": self.enabled,
            "setting": self.setting,
            "reason": self.reason,
            "probe_seconds": self.probe_seconds,
        }


def _probe_compilation(device: DeviceSetting) -> None:
    """Compile and run a small fused function on ``device``; raises whatever inductor raises."""
    compiled = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1.0, dynamic=True)
    sample = torch.linspace(-1.0, 1.0, 16, device=device)
    expected = torch.nn.functional.silu(sample) * sample + 1.0
    if not torch.allclose(compiled(sample), expected):
        raise RuntimeError("the probe's compiled result differs from eager")


Probe = Callable[[DeviceSetting], None]


def resolve_compile(
    setting: CompileSetting, device: DeviceSetting = "cpu", *, probe: Probe | None = None
) -> CompileChoice:
    """Decide whether local training compiles here: ``"auto"`` and ``"on"`` run ``probe``
    (default: compile a small function), ``"on"`` raises CompileError naming the setting when it
    fails, ``"auto"`` falls back to eager with the probe's error as the reason."""
    if setting == "off":
        return CompileChoice(False, setting, "switched off", None)
    started = time.perf_counter()
    try:
        (probe or _probe_compilation)(device)
    except Exception as error:  # inductor raises many types (no compiler, no headers, ...)
        reason = f"the probe compilation failed: {type(error).__name__}: {error}".strip()
        if setting == "on":
            raise CompileError(
                f"train.compile = 'on' but torch.compile does not work on this machine "
                f"({reason}); use 'auto' or 'off'"
            ) from error
        return CompileChoice(False, setting, reason.splitlines()[0][:300], None)
    seconds = time.perf_counter() - started
    return CompileChoice(True, setting, "the probe compilation succeeded", seconds)


@cache
def machine_compile(setting: CompileSetting, device: DeviceSetting = "cpu") -> CompileChoice:
    """:func:`resolve_compile` once per process, setting and device, logged once."""
    choice = resolve_compile(setting, device)
    log.info("%s", choice.describe())
    return choice


# The attribute a prepared decoder layer keeps its compiled call in. On the layer, not in a
# registry keyed by layer: the compiled call holds the layer (its bound ``_call_impl``), so a
# registry entry would keep every dropped model's layers, and their weights, alive.
_COMPILED_CALL = "_fedsilo_compiled_call"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (peft-wrapped) causal LM, in order."""
    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(decoder).__name__} has no list of decoder layers to compile")
    return list(layers)


def prepare_compiled_training(model: nn.Module) -> None:
    """Make :func:`compiled_training` run ``model``'s decoder layers compiled.

    Nothing is compiled yet: inductor compiles on the first training step (seconds to a
    minute; later processes reuse its on-disk cache).
    """
    for layer in decoder_layers(model):
        if not hasattr(layer, _COMPILED_CALL):
            setattr(layer, _COMPILED_CALL, torch.compile(layer._call_impl, dynamic=True))


def _compiled_calls(model: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]] | None:
    """Each decoder layer with its compiled call; None unless every layer was prepared."""
    try:
        layers = decoder_layers(model)
    except TypeError:
        return None
    calls = [(layer, getattr(layer, _COMPILED_CALL, None)) for layer in layers]
    if any(call is None for _, call in calls):
        return None
    return [(layer, call) for layer, call in calls if call is not None]


def is_prepared(model: nn.Module) -> bool:
    """Whether :func:`prepare_compiled_training` was applied to ``model``."""
    return _compiled_calls(model) is not None


@contextmanager
def compiled_training(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s decoder layers run compiled if it was prepared.

    A layer's compiled call is installed the way ``nn.Module.compile`` installs it (the module
    calls ``_compiled_call_impl`` when set) and removed on exit, so everything outside the
    block (evaluation, generation) runs eager on the same module.
    """
    calls = _compiled_calls(model)
    if calls is None:
        yield
        return
    for layer, call in calls:
        layer._compiled_call_impl = call
    try:
        yield
    finally:
        for layer, _ in calls:
            layer._compiled_call_impl = None
