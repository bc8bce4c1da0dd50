"""Helpers to run the real ServerApp and ClientApp over the in-process grid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.config import FedsiloConfig
from fedsilo.server.app import ServerJob, build_server_app
from fedsilo.simulation.inprocess_grid import InProcessGrid


class RecordingReporter:
    """Keeps what a run reports, for assertions."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.notices: list[str] = []

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        self.rounds.append(record)

    def notice(self, text: str) -> None:
        self.notices.append(text)


def run_with_grid(
    config: FedsiloConfig,
    run_dir: Path,
    client_app: ClientApp,
    *,
    resume: bool = False,
    unreachable: Iterable[int] = (),
) -> RecordingReporter:
    """Run the ServerApp over an in-process grid of ``config.num_sites`` nodes."""
    reporter = RecordingReporter()
    grid = InProcessGrid(client_app, num_nodes=config.num_sites, unreachable=unreachable)
    job = ServerJob(config=config, run_dir=run_dir, resume=resume, reporter=reporter)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    build_server_app(job)(grid, context)
    return reporter
