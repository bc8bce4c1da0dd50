"""A coordinator's front (SuperLink and nginx, sites enrolled, no run) shared by a module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsilo.config import load_config
from fedsilo.deploy.control import Control
from fedsilo.deploy.coordinator import CoordinatorService

from .harness import Deployment, build_deployment


class QuietReporter:
    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        pass

    def notice(self, text: str) -> None:
        pass


@pytest.fixture(scope="module")
def coordinator_front(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[CoordinatorService, Deployment]]:
    """The SuperLink and nginx as `fedsilo coordinator start` runs them, sites registered."""
    deployment = build_deployment(tmp_path_factory.mktemp("front"), tiny_model_dir)
    service = CoordinatorService(
        load_config(deployment.config_path), resume=False, reporter=QuietReporter(), say=print
    )
    service.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        service.start_superlink()
        service.start_proxy()
        control = Control(service.superlink_address, ca_cert=service.files.ca_cert)
        try:
            service.enroll(control)
        finally:
            control.close()
        yield service, deployment
    finally:
        deployment.close()  # site processes a test started
        service.shutdown()  # the SuperLink and nginx, each by its PID
