"""A round survives failing sites, and stops cleanly when too few answer."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client.app import handle_train
from fedsilo.client.site import Site
from fedsilo.config import FedsiloConfig
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.federation import FederationError
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID
from fedsilo.simulation.sites import SimulatedSites

from .conftest import run_with_grid


class CrashingSites:
    """Sites whose partition ``broken`` raises in the given rounds (all rounds if None)."""

    def __init__(
        self, inner: SimulatedSites, broken: set[int], rounds: set[int] | None = None
    ) -> None:
        self.inner = inner
        self.broken = broken
        self.rounds = rounds
        self.current_round = 0

    def site_for(self, context: Context) -> Site:
        index = context.node_config["partition-id"]
        if index in self.broken and (self.rounds is None or self.current_round in self.rounds):
            raise OSError(f"site {index}: disk full")
        return self.inner.site_for(context)


def crashing(
    broken: set[int], rounds: set[int] | None = None
) -> Callable[[SimulatedSites], ClientApp]:
    def make_app(inner: SimulatedSites) -> ClientApp:
        sites = CrashingSites(inner, broken, rounds)
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            sites.current_round = int(message.metadata.group_id)
            return handle_train(message, context, sites)

        return app

    return make_app


def test_crashing_site_is_left_out_and_reported(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1})

    run_with_grid(config, tmp_path / "run", crashing({1}))

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    assert round_one["sites_failed"] == 1
    assert "disk full" in next(iter(round_one["failures"].values()))


def test_silent_site_times_out_and_round_goes_on(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1})

    run_with_grid(config, tmp_path / "run", unreachable={FIRST_NODE_ID + 2})

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    assert round_one["failures"] == {f"node-{FIRST_NODE_ID + 2}": "no reply within 1800 s"}


def test_too_few_sites_stops_after_retries_and_keeps_checkpoints(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 2}, strategy={"min_sites": 2, "max_round_attempts": 2})

    with pytest.raises(FederationError, match="round 2: fewer than min_sites=2") as caught:
        run_with_grid(config, tmp_path / "run", crashing({0, 1}, rounds={2}))

    assert "disk full" in str(caught.value)
    folder = RunFolder(tmp_path / "run")
    assert folder.checkpoint_rounds() == [0, 1]
    assert [m["round"] for m in folder.read_metrics()] == [0, 1]
    status = folder.read_json(folder.status_path)
    assert status["status"] == "failed"
    assert "min_sites" in status["reason"]


@pytest.mark.parametrize("strategy", [{}, {"server_momentum": 0.5}], ids=["fedavg", "momentum"])
def test_resume_after_failed_round_matches_an_uninterrupted_run(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, strategy: dict[str, float]
) -> None:
    # With momentum, round 2 needs the velocity of round 1 from the checkpoint.
    config = make_config(run={"rounds": 2}, strategy=strategy)
    with pytest.raises(FederationError):
        run_with_grid(config, tmp_path / "interrupted", crashing({0, 1}, rounds={2}))

    run_with_grid(config, tmp_path / "interrupted", resume=True)
    run_with_grid(config, tmp_path / "straight")

    resumed = RunFolder(tmp_path / "interrupted")
    straight = RunFolder(tmp_path / "straight")
    assert [m["round"] for m in resumed.read_metrics()] == [0, 1, 2]
    assert resumed.read_json(resumed.status_path)["status"] == "completed"
    final_resumed = resumed.load_checkpoint(2).adapter
    final_straight = straight.load_checkpoint(2).adapter
    assert all(np.array_equal(final_resumed[n], final_straight[n]) for n in final_straight)


def test_a_resumed_round_numbers_its_attempts_after_those_it_opened(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # An attempt is a secure session that sites open once, and a resumed coordinator is a new
    # Flower run: it must not ask them to open attempt 1 of the round again.
    config = make_config(run={"rounds": 2})
    with pytest.raises(FederationError):
        run_with_grid(config, tmp_path / "run", crashing({0, 1}, rounds={2}))

    run_with_grid(config, tmp_path / "run", resume=True)

    opened = [
        (entry.payload["round"], entry.payload["attempt"])
        for entry in read_entries(tmp_path / "run" / "ledger.db")
        if entry.kind is EntryKind.ROUND_OPENED
    ]
    assert opened == [(1, 1), (2, 1), (2, 2), (2, 3)]
    [_, _, round_two] = RunFolder(tmp_path / "run").read_metrics()
    assert round_two["attempts"] == 1  # attempts this run took


def test_resume_with_changed_settings_is_refused(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1})
    run_with_grid(config, tmp_path / "run")
    changed = make_config(run={"rounds": 2}, train={"learning_rate": 0.5})

    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        run_with_grid(changed, tmp_path / "run", resume=True)


def test_new_run_refuses_a_folder_that_holds_a_run(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1})
    run_with_grid(config, tmp_path / "run")

    with pytest.raises(FileExistsError, match="already holds a run"):
        run_with_grid(config, tmp_path / "run")


def test_a_node_that_fails_later_is_named_by_the_site_it_signed_as(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 2})

    run_with_grid(config, tmp_path / "run", crashing({1}, rounds={2}))

    [_, round_one, round_two] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_failed"] == 0
    node = FIRST_NODE_ID + 1
    [site] = [name for name in round_one["sites"] if name not in round_two["sites"]]
    [(sender, reason)] = round_two["failures"].items()
    assert sender == f"node-{node} ({site})"
    assert "disk full" in reason
