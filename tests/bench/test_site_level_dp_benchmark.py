"""benchmarks/site_level_dp.py: shares read against the same seed's run without DP; smoke run."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from . import benchmark_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return benchmark_script("site_level_dp")


def _run(setting: str, seed: int, loss: float, epsilon: float | None = 8.0) -> dict[str, object]:
    return {
        "sites": 100,
        "sites_per_round": 10,
        "setting": setting,
        "seed": seed,
        "epsilon": epsilon,
        "noise_multiplier": None if epsilon is None else 1.7,
        "untrained_gold_loss": 5.0,
        "gold_loss": loss,
    }


def test_each_seed_is_read_against_its_own_run_without_dp(bench: ModuleType) -> None:
    runs = [
        _run("no_dp", 0, 4.0, None),
        _run("no_dp", 1, 4.5, None),
        _run("eps8", 0, 4.5),  # keeps half of seed 0's drop of 1.0
        _run("eps8", 1, 4.75),  # keeps half of seed 1's drop of 0.5
    ]

    rows = {row["setting"]: row for row in bench.summarize(runs)["rows"]}

    assert rows["eps8"]["share_of_non_private"] == pytest.approx(0.5)
    assert rows["eps8"]["share_ci95"] == pytest.approx([0.5, 0.5])
    assert rows["eps8"]["seeds"] == [0, 1]
    assert rows["no_dp"]["gold_loss"] == pytest.approx(4.25)


def test_a_run_without_its_reference_has_no_share(bench: ModuleType) -> None:
    rows = bench.summarize([_run("eps8", 3, 4.5)])["rows"]

    assert rows[0]["share_of_non_private"] is None


@pytest.mark.slow
def test_smoke_run_measures_every_setting_within_its_epsilon(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "site-level-dp.json"

    bench.main(["--smoke", "--out", str(out)])

    result = json.loads(out.read_text())
    settings = {(run["sites"], run["setting"]) for run in result["runs"]}
    assert settings == {
        (4, "no_dp"),
        (4, "eps8"),
        (8, "no_dp"),
        (8, "eps8"),
        (4, "no_dp+secagg"),
        (4, "eps8+secagg"),
    }
    for run in result["runs"]:
        if run["epsilon"] is not None:
            assert 0 < run["spent_epsilon"] <= run["epsilon"]
