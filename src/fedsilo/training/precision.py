"""The compute precision of local training and evaluation, chosen for the CPU it runs on.

bf16 halves the bytes of every frozen base weight and, on CPUs with native bf16 matrix
multiply (AVX512-BF16 or AMX), runs the matrix products several times faster than fp32. On a
CPU without it torch emulates bf16 and is slower than fp32, so ``"auto"`` looks at the CPU
flags *and* times one second of both precisions before choosing; it never assumes.

On a CUDA GPU (``train.device = "cuda"``) ``"auto"`` is bf16 wherever torch reports the GPU
supports it (every GPU since Ampere runs bf16 on its tensor cores); no probe runs.

Only the frozen base weights are held in bf16. LoRA parameters, their gradients, the optimizer
state and everything a site sends stay fp32, so aggregation, secure aggregation (bit-exact
fixed-point sums) and the wire format are the same in both precisions. Under bf16 the forward
pass runs inside ``torch.autocast``; losses are computed from fp32 logits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

from fedsilo.config.schema import DeviceSetting, PrecisionSetting
from fedsilo.training.device import model_device

log = logging.getLogger(__name__)

# oneDNN, which runs torch's bf16 matrix products on the CPU, caches up to 1,024 compiled
# primitives by default. Training and scoring SmolLM2 need far fewer at a time, and the
# surplus stayed resident: a bf16 site's peak memory fell from 1,768 MB to 1,562 MB at
# capacity 64 with the same step time (batch 16; gold scoring time unchanged too). oneDNN
# reads the variable when it creates its first primitive, so it is set here, before any bf16
# product (the precision probe is the first); a value the operator set is kept.
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 64
os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_CAPACITY))
# torch's own cache in front of oneDNN (ideep's computation cache, 1,024 entries by default)
# keeps a prepared matrix product per input shape; training sees a new shape for every batch
# length, and the entries held about 120 MB more at every step's end in bf16 (SmolLM2, batch
# 16, one thread: 1,566 -> 1,440 MB peak, same step time; fp32 does not use it). Read once,
# at the first bf16 product, so it is set here as well.
IDEEP_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"
IDEEP_CACHE_CAPACITY = 64
os.environ.setdefault(IDEEP_CACHE_VARIABLE, str(IDEEP_CACHE_CAPACITY))

Precision = Literal["bf16", "fp32"]

# CPU flags (Linux /proc/cpuinfo) that mean bf16 matrix multiply runs in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# auto picks bf16 only when the probe measures at least this speed-up over fp32: a native
# unit that is not actually faster (or a busy machine that hides it) keeps the exact path.
MIN_BF16_SPEEDUP = 1.3
_TORCH_DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


class PrecisionError(ValueError):
    """A precision setting this machine or this model cannot honour."""


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a process trains in, and the evidence it was chosen on."""

    precision: Precision
    setting: PrecisionSetting
    native_bf16: bool  # the CPU reports a native bf16 matrix-multiply flag (GPU: supports bf16)
    fp32_gflops: float | None  # probe figures (None when no probe ran)
    bf16_gflops: float | None
    device: DeviceSetting = "cpu"  # where it computes

    def describe(self) -> str:
        """One line for the log: what was chosen and why."""
        figures = ""
        if self.fp32_gflops is not None and self.bf16_gflops is not None:
            figures = (
                f"; probe: fp32 {self.fp32_gflops:.0f} GFLOP/s, bf16 {self.bf16_gflops:.0f} "
                f"GFLOP/s ({self.bf16_gflops / self.fp32_gflops:.2f}x)"
            )
        native = "native bf16" if self.native_bf16 else "no native bf16"
        where = "" if self.device == "cpu" else f" on {self.device}"
        return f"precision {self.precision}{where} (setting {self.setting!r}, {native}{figures})"

    def as_record(self) -> dict[str, str | float | bool | None]:
        """The choice as JSON-ready values (run.json, the ledger's run-start entry)."""
        return {
            "precision": self.precision,
            "setting": self.setting,
            "native_bf16": self.native_bf16,
            "probe_fp32_gflops": self.fp32_gflops,
            "probe_bf16_gflops": self.bf16_gflops,
            "device": self.device,
        }


def _cpuinfo_field(cpuinfo: Path, keys: tuple[str, ...]) -> str | None:
    """The first processor's value of the first of ``keys`` in ``cpuinfo`` (None where the file
    or the field does not exist)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    return frozenset((_cpuinfo_field(cpuinfo, ("flags", "Features")) or "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it ("unknown" where it does not)."""
    return _cpuinfo_field(cpuinfo, ("model name",)) or "unknown"


def has_native_bf16(flags: frozenset[str]) -> bool:
    """Whether ``flags`` include a bf16 matrix-multiply instruction set."""
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def matmul_gflops(dtype: torch.dtype, *, seconds: float = 0.5) -> float:
    """GFLOP/s of repeated 512x576 by 576x1536 products (a SmolLM2 MLP shape) in ``dtype``.

    Runs on the current torch thread count for about ``seconds``; a product is 2*m*k*n FLOPs.
    """
    m, k, n = 512, 576, 1536
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(m, k, generator=generator).to(dtype)
    right = torch.randn(k, n, generator=generator).to(dtype)
    torch.matmul(left, right)  # warm-up: first calls pick kernels and allocate
    products = 0
    started = time.perf_counter()
    while True:
        torch.matmul(left, right)
        products += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2.0 * m * k * n * products / elapsed / 1e9


Probe = Callable[[], tuple[float, float]]


def probe_speeds(*, seconds: float = 0.5) -> tuple[float, float]:
    """Measured (fp32, bf16) GFLOP/s of this CPU, about ``2 * seconds`` in all."""
    return matmul_gflops(torch.float32, seconds=seconds), matmul_gflops(
        torch.bfloat16, seconds=seconds
    )


def resolve_precision(
    setting: PrecisionSetting,
    *,
    flags: frozenset[str] | None = None,
    probe: Probe | None = None,
    device: DeviceSetting = "cpu",
    gpu_bf16: bool | None = None,
) -> PrecisionChoice:
    """Turn a configured setting into the precision this machine trains in.

    ``"fp32"`` is always honoured. ``"bf16"`` is refused (PrecisionError naming the setting)
    on a CPU without native bf16, where it would be slower than fp32 and gain nothing.
    ``"auto"`` chooses bf16 when the CPU reports native bf16 and the probe measures at least
    :data:`MIN_BF16_SPEEDUP` over fp32; fp32 otherwise. ``flags`` default to this CPU's and
    ``probe`` to :func:`probe_speeds` (tests pass their own).

    On ``device = "cuda"`` the CPU is not looked at: ``"auto"`` and ``"bf16"`` mean bf16 when
    the GPU supports it (``gpu_bf16``, default ``torch.cuda.is_bf16_supported()``); ``"auto"``
    falls back to fp32 and ``"bf16"`` is refused on a GPU without it.
    """
    if device == "cuda":
        return _resolve_on_gpu(setting, gpu_bf16)
    native = has_native_bf16(cpu_flags() if flags is None else flags)
    if setting == "fp32":
        return PrecisionChoice("fp32", setting, native, None, None)
    if not native:
        if setting == "bf16":
            raise PrecisionError(
                "train.precision = 'bf16' needs a CPU with native bf16 matrix multiply "
                f"(one of the flags {', '.join(NATIVE_BF16_FLAGS)}); this CPU has none. "
                "Use 'auto' or 'fp32'."
            )
        return PrecisionChoice("fp32", setting, native, None, None)
    fp32_gflops, bf16_gflops = (probe or probe_speeds)()
    if setting == "bf16":
        return PrecisionChoice("bf16", setting, native, fp32_gflops, bf16_gflops)
    fast = bf16_gflops >= MIN_BF16_SPEEDUP * fp32_gflops
    return PrecisionChoice("bf16" if fast else "fp32", setting, native, fp32_gflops, bf16_gflops)


def _resolve_on_gpu(setting: PrecisionSetting, gpu_bf16: bool | None) -> PrecisionChoice:
    supported = torch.cuda.is_bf16_supported() if gpu_bf16 is None else gpu_bf16
    if setting == "fp32" or (setting == "auto" and not supported):
        return PrecisionChoice("fp32", setting, supported, None, None, "cuda")
    if not supported:
        raise PrecisionError(
            "train.precision = 'bf16' needs a GPU that supports bf16; this one does not. "
            "Use 'auto' or 'fp32'."
        )
    return PrecisionChoice("bf16", setting, supported, None, None, "cuda")


@cache
def machine_precision(setting: PrecisionSetting, device: DeviceSetting = "cpu") -> PrecisionChoice:
    """:func:`resolve_precision` once per process, setting and device, logged once."""
    choice = resolve_precision(setting, device=device)
    log.info("%s", choice.describe())
    return choice


def torch_dtype(precision: Precision) -> torch.dtype:
    """The torch dtype of the frozen base weights in ``precision``."""
    return _TORCH_DTYPES[precision]


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (kept fp32 in every precision)."""
    return "lora_" in name


def hold_base_weights_in(model: nn.Module, precision: Precision) -> None:
    """Store every frozen non-adapter parameter and buffer of ``model`` in ``precision``.

    Adapter tensors (trainable or, with FFA-LoRA, frozen A) stay fp32: they are what is
    trained, aggregated and sent. Floating-point buffers such as rotary frequencies stay fp32
    as well; they are small and their precision matters.
    """
    dtype = torch_dtype(precision)
    for name, param in model.named_parameters():
        if param.requires_grad or is_adapter_parameter(name):
            continue
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def base_weights_precision(model: nn.Module) -> Precision:
    """The precision the frozen base weights of ``model`` are held in."""
    for name, param in model.named_parameters():
        if not is_adapter_parameter(name) and param.is_floating_point():
            return "bf16" if param.dtype == torch.bfloat16 else "fp32"
    return "fp32"


@contextmanager
def compute_in(precision: Precision, device: torch.device | None = None) -> Iterator[None]:
    """Run the enclosed forward passes in ``precision`` (autocast for bf16, nothing for fp32)
    on ``device`` (the model's; default the CPU)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast("cpu" if device is None else device.type, dtype=torch.bfloat16):
        yield


@contextmanager
def forward_in(model: nn.Module, precision: Precision) -> Iterator[None]:
    """Run the enclosed forward passes of ``model`` in ``precision`` on the model's device.

    As :func:`compute_in`, and in bf16 the LoRA layers also read their input as it comes:
    peft would copy each adapted activation to the adapter's fp32 and autocast would copy it
    straight back, two copies per layer per forward plus one held for backward, for the same
    values (a bf16 value is exact in fp32). Training and scoring give the same results to the
    bit with and without the copies (tests/training/test_loop.py, tests/privacy_dp_sgd/,
    tests/evaluation/). Only under autocast: without it an uncast bf16 input would meet
    the fp32 adapter weights.
    """
    with (
        compute_in(precision, model_device(model)),
        disable_input_dtype_casting(model, active=precision == "bf16"),
    ):
        yield
