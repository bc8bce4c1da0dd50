"""Smoke test through Flower's own simulation engine (Ray), same apps as in-process."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsilo.config import FedsiloConfig
from fedsilo.model.base import ModelError
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate

from .conftest import RecordingReporter


def test_fedsilo_processes_do_not_phone_home() -> None:
    import fedsilo  # noqa: F401  (the import sets the defaults)

    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_two_sites_one_round_on_ray(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 1, "engine": "ray"},
        task={"num_sites": 2},
        strategy={"min_sites": 2},
    )
    run_dir = tmp_path / "run"

    simulate(
        SimulationRequest(
            config=config, run_dir=run_dir, resume=False, reporter=RecordingReporter()
        )
    )

    folder = RunFolder(run_dir)
    assert [m["sites_ok"] for m in folder.read_metrics()] == [0, 2]
    assert folder.read_json(folder.status_path)["status"] == "completed"


def test_failed_ray_run_raises_instead_of_passing_silently(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 1, "engine": "ray"},
        model={"base": str(tmp_path / "no-such-model")},
        task={"num_sites": 2},
        strategy={"min_sites": 2},
    )

    with pytest.raises(ModelError, match="no-such-model"):
        simulate(
            SimulationRequest(
                config=config, run_dir=tmp_path / "run", resume=False, reporter=RecordingReporter()
            )
        )

    status = RunFolder(tmp_path / "run").read_json(RunFolder(tmp_path / "run").status_path)
    assert status["status"] == "failed"
    assert "no-such-model" in status["reason"]
