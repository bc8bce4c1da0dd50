"""The results pages read each goal where it is measured: every size of the secure-aggregation
benchmark, and the mean over seeds of a quality task run with several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from . import benchmark_script


def _secagg_row(system: str, sites: int, params: int, wall: float) -> dict[str, Any]:
    return {
        "system": system, "sites": sites, "params": params, "wall_s": [wall, wall],
        "median_wall_s": wall, "median_parallel_s": wall, "bytes_up_per_site": 4 * params,
    }  # fmt: skip


def test_the_secure_aggregation_goal_is_read_at_every_size_measured() -> None:
    report = benchmark_script("report_secagg")
    rows = [
        # 100k parameters: overheads 0.05 s (ours) and 0.10 s (Flower): 2x, not met.
        _secagg_row("plain", 4, 100_000, 0.05),
        _secagg_row("secagg", 4, 100_000, 0.10),
        _secagg_row("flower-secagg+", 4, 100_000, 0.15),
        # 1M parameters: 0.1 s against 1.0 s: 10x, met.
        _secagg_row("plain", 4, 1_000_000, 0.5),
        _secagg_row("secagg", 4, 1_000_000, 0.6),
        _secagg_row("flower-secagg+", 4, 1_000_000, 1.5),
    ]
    result = {"rows": rows, "measured_at": "now", "machine": {"cpus": 2}, "tenseal": "x",
              "flwr": "1", "repeats": 2}  # fmt: skip

    text = "\n".join(report.secagg_section(result))

    assert "4 sites, 100,000 parameters" in text and "2.0x lower (goal >= 4x: **not met**" in text
    assert "4 sites, 1,000,000 parameters" in text and "10.0x lower (goal >= 4x: met" in text


def test_the_quality_goal_is_read_on_the_mean_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = benchmark_script("quality_report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)

    def entry(seeds: list[int], ratio: float) -> dict[str, Any]:
        return {"seeds": seeds, "mean": 0.5, "ci95": None, "ratio_to_centralized": ratio}

    summary = {
        "tasks": {
            "t": {"algorithms": {
                "centralized": entry([0, 1], 1.0), "fedavg": entry([0, 1], 0.939),
                "ffa-lora": entry([0, 1], 0.95), "fedadam": entry([0], 1.2),
            }},
            "one-seed": {"algorithms": {"centralized": entry([0], 1.0),
                                        "fedavg": entry([0], 1.05)}},
        }
    }  # fmt: skip
    (tmp_path / "quality-summary.json").write_text(json.dumps(summary))

    readings = report._families_over_seeds()

    # One seed is no mean; FedAdam's single seed never counts as the best over seeds.
    assert readings == ["`t` (seeds 0, 1) 93.9%, misses the goal (best ffa-lora 95.0%)"]
