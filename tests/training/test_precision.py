"""Choosing the compute precision: CPU flags, the probe, and the base weights it leaves."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.training import precision as precision_module
from fedsilo.training.precision import (
    PrecisionError,
    base_weights_precision,
    cpu_flags,
    cpu_model,
    hold_base_weights_in,
    machine_precision,
    resolve_precision,
)

NATIVE = frozenset({"avx2", "avx512f", "avx512_bf16"})
EMULATED = frozenset({"avx2", "fma"})


def _no_probe() -> tuple[float, float]:
    raise AssertionError("the probe must not run")


@pytest.fixture(autouse=True)
def _fresh_choice() -> Iterator[None]:
    machine_precision.cache_clear()
    yield
    machine_precision.cache_clear()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")

    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R45\nflags\t\t: fpu\n")

    assert cpu_model(cpuinfo) == "AMD EPYC 9R45"
    assert cpu_model(tmp_path / "missing") == "unknown"


@pytest.mark.parametrize("preset", ["ONEDNN_CACHE_VARIABLE", "IDEEP_CACHE_VARIABLE"])
def test_importing_sets_small_onednn_caches_unless_the_operator_chose_them(preset: str) -> None:
    # One process per preset variable (an import costs seconds): the preset one keeps the
    # operator's value, the other gets fedsilo's.
    variables = ("ONEDNN_CACHE_VARIABLE", "IDEEP_CACHE_VARIABLE")
    names = [getattr(precision_module, variable) for variable in variables]
    env = {k: v for k, v in os.environ.items() if k not in names}
    env[getattr(precision_module, preset)] = "7"
    script = (
        "import os, fedsilo.training.precision as p; "
        f"print(*(os.environ[getattr(p, v)] for v in {variables!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    expected = ["7" if variable == preset else "64" for variable in variables]
    assert done.stdout.split() == expected


def test_auto_takes_fp32_without_native_bf16_and_runs_no_probe() -> None:
    choice = resolve_precision("auto", flags=EMULATED, probe=_no_probe)

    assert choice.precision == "fp32"
    assert not choice.native_bf16


def test_auto_takes_bf16_where_native_and_measured_faster() -> None:
    choice = resolve_precision("auto", flags=NATIVE, probe=lambda: (60.0, 230.0))

    assert choice.precision == "bf16"
    assert (choice.fp32_gflops, choice.bf16_gflops) == (60.0, 230.0)
    assert "3.83x" in choice.describe()


def test_auto_keeps_fp32_when_the_probe_measures_no_gain() -> None:
    assert resolve_precision("auto", flags=NATIVE, probe=lambda: (60.0, 66.0)).precision == "fp32"


def test_fp32_is_always_honoured() -> None:
    assert resolve_precision("fp32", flags=NATIVE, probe=_no_probe).precision == "fp32"


def test_bf16_is_refused_without_native_bf16_naming_the_setting() -> None:
    with pytest.raises(PrecisionError, match=r"train\.precision = 'bf16'"):
        resolve_precision("bf16", flags=EMULATED, probe=_no_probe)


def test_bf16_base_weights_keep_adapters_fp32(make_config: Callable[..., FedsiloConfig]) -> None:
    loaded = load_model_with_adapter(make_config(lora={"ffa": True}))

    hold_base_weights_in(loaded.model, "bf16")

    dtypes = {name: param.dtype for name, param in loaded.model.named_parameters()}
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if "lora_" not in name)
    assert base_weights_precision(loaded.model) == "bf16"


def test_auto_falls_back_to_fp32_on_the_tiny_model_without_native_bf16(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: EMULATED)

    loaded = load_model_with_adapter(make_config(train={"precision": "auto"}))

    assert loaded.precision.precision == "fp32"
    assert base_weights_precision(loaded.model) == "fp32"


def test_auto_with_native_bf16_holds_the_tiny_model_in_bf16(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: NATIVE)
    monkeypatch.setattr(precision_module, "probe_speeds", lambda: (50.0, 200.0))

    loaded = load_model_with_adapter(make_config(train={"precision": "auto"}))

    assert loaded.precision.precision == "bf16"
    assert base_weights_precision(loaded.model) == "bf16"
