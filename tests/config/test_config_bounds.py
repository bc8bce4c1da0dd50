"""No float setting may be inf or NaN, and counts have sane upper bounds: a clear ConfigError
naming the field (the CLI exits 2) instead of a MemoryError or a run that divides by infinity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedsilo.cli.main import main
from fedsilo.config import ConfigError, parse_config


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("lora", "alpha"),
        ("strategy", "proximal_mu"),
        ("strategy", "server_learning_rate"),
        ("privacy", "site_noise_multiplier"),
        ("privacy", "site_clip_norm"),
        ("privacy", "max_grad_norm"),
        ("secure_aggregation", "clip"),
        ("task", "alpha"),
        ("train", "max_grad_norm"),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_float_setting_is_refused(section: str, field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{field}"):
        parse_config({section: {field: value}}, source="run.toml")


def test_non_finite_noise_multiplier_is_refused() -> None:
    privacy: dict[str, Any] = {"record_level": True, "noise_multiplier": float("inf")}

    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier"):
        parse_config({"privacy": privacy}, source="run.toml")


@pytest.mark.parametrize(
    ("section", "field"),
    [("run", "rounds"), ("run", "torch_threads"), ("task", "num_sites"), ("train", "batch_size")],
)
def test_absurd_count_is_refused(section: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{field}.*less than or equal"):
        parse_config({section: {field: 10**12}}, source="run.toml")


def test_absurd_rounds_exit_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.toml"
    path.write_text("[run]\nrounds = 1000000000000\ntorch_threads = 1000000000\n")

    assert main(["simulate", str(path), "--out", str(tmp_path / "run")]) == 2

    error = capsys.readouterr().err
    assert "run.rounds" in error and "run.torch_threads" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [1e-300, 1e300], ids=["tiny", "huge"])
def test_a_secure_aggregation_clip_no_quantization_can_serve_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match=r"secure_aggregation\.clip"):
        parse_config({"secure_aggregation": {"clip": value}}, source="run.toml")
