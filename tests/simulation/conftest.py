"""Helpers to run the real ServerApp and ClientApp over the in-process grid."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.client.app import build_client_app
from fedsilo.config import FedsiloConfig
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.app import build_server_app
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, prepare_job
from fedsilo.simulation.inprocess_grid import InProcessGrid
from fedsilo.simulation.sites import SimulatedSites


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
    make_app: Callable[[SimulatedSites], ClientApp] = build_client_app,
    *,
    resume: bool = False,
    unreachable: Iterable[int] = (),
    grid_class: type[InProcessGrid] = InProcessGrid,
) -> RecordingReporter:
    """Enroll, then run the ServerApp over an in-process grid of ``config.num_sites`` nodes.

    ``make_app`` builds the ClientApp from the simulated sites (tests wrap it to misbehave);
    ``grid_class`` lets a test watch the deliveries.
    """
    reporter = RecordingReporter()
    job = prepare_job(
        SimulationRequest(config=config, run_dir=run_dir, resume=resume, reporter=reporter)
    )
    sites = SimulatedSites(config, run_dir=run_dir, membership=job.membership)
    with grid_class(
        make_app(sites),
        num_nodes=config.num_sites,
        unreachable=unreachable,
        lanes=config.run.concurrent_sites,
        lane_threads=config.run.site_threads,
    ) as grid:
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        build_server_app(job)(grid, context)
    return reporter


def resume_and_stop_after_round(
    config: FedsiloConfig, run_dir: Path, round_number: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume ``run_dir`` under ``config`` and stop it once round ``round_number``'s checkpoint
    is written, before its metrics line, as a crash there would."""
    original = RunFolder.append_metrics

    def stop(self: RunFolder, record: dict[str, object]) -> None:
        if record["round"] == round_number:
            raise RuntimeError(f"stopped after round {round_number}'s checkpoint")
        original(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "append_metrics", stop)
        with pytest.raises(RuntimeError, match=f"stopped after round {round_number}"):
            run_with_grid(config, run_dir, resume=True)


def stop_run_in_last_round(folder: RunFolder, round_number: int, *, aggregated: bool) -> None:
    """Make a finished run look as it does while its last round, ``round_number``, is under way
    (``aggregated=False``: its updates are ledgered, not its aggregate) or right after a crash
    between ledgering the aggregate and writing the round's metrics (``aggregated=True``): the
    ledger is cut there, the round's checkpoint, final/ and metrics line are removed, and
    status.json says "running"."""
    aggregate = next(
        entry.seq
        for entry in read_entries(folder.ledger_path)
        if entry.kind is EntryKind.ROUND_AGGREGATED and entry.payload["round"] == round_number
    )
    first_cut = aggregate + 1 if aggregated else aggregate
    with closing(sqlite3.connect(folder.ledger_path)) as connection, connection:
        connection.execute("DELETE FROM entries WHERE seq >= ?", (first_cut,))
    shutil.rmtree(folder.checkpoint_dir(round_number))
    shutil.rmtree(folder.final_dir)
    lines = folder.metrics_path.read_text().splitlines()
    folder.metrics_path.write_text("\n".join(lines[:-1]) + "\n")
    folder.write_json(folder.status_path, {"status": "running"})
