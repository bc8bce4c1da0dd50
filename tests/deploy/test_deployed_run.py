"""End to end on Flower's deployment engine: a SuperLink behind nginx and three SuperNodes.

Everything runs as separate processes on 127.0.0.1 with TLS (the federation's own CA) and
SuperNode authentication, started with the `fedsilo coordinator start` and `fedsilo site start`
commands. Slow (about 1.5 min each on 2 cores): run with `-m slow`.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.cli.main import main
from fedsilo.ledger import EntryKind, read_entries

from .harness import SITES, Deployment, Started, build_deployment, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def deployment(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Deployment]:
    built = build_deployment(tmp_path, tiny_model_dir, rounds=3, round_timeout_s=25.0)
    try:
        yield built
    finally:
        built.close()  # every process this test started, by its own PID


def _supernode_pid(site: Started) -> int:
    found = re.findall(r"SuperNode pid (\d+)", site.log())
    assert found, site.log()
    return int(found[-1])


def _supernode_log_shows(supernode_log: Path, *, round_number: int, step: str) -> bool:
    """Whether the SuperNode's log shows ``step`` (e.g. "Receiving: train message") in that
    round, completed (Flower's next line says "... successfully")."""
    pattern = rf"ROUND {round_number}\][^\n]*\n[^\n]*{step}[^\n]*\n[^\n]*successfully"
    if not supernode_log.exists():  # the site has not started its SuperNode yet
        return False
    return re.search(pattern, supernode_log.read_text(errors="replace")) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tasks_sent(run_dir: Path, round_number: int) -> int:
    ledger = run_dir / "ledger.db"
    if not ledger.exists():
        return 0
    return sum(
        1
        for entry in read_entries(ledger)
        if entry.kind == EntryKind.TASK_SENT and entry.payload.get("round") == round_number
    )


def test_three_sites_survive_a_supernode_killed_mid_round(deployment: Deployment) -> None:
    coordinator = deployment.start_coordinator()
    sites = {name: deployment.start_site(name) for name in SITES}
    watch = [coordinator, *sites.values()]
    victim = sites["gamma"]
    supernode_log = deployment.root / "gamma/state/supernode.log"
    # Tiny-model training answers a task within a second, faster than a test can react to the
    # task arriving. So freeze gamma's site process (its worker and SuperNode supervisor) once
    # its last round-1 reply (the receipt query's) has reached the coordinator, let its
    # SuperNode take the round-2 task, and kill the SuperNode while it holds the task: the
    # round is then certainly under way and gamma's part of it unanswerable.
    wait_for(
        lambda: _supernode_log_shows(
            supernode_log, round_number=1, step="Sending: query.receipt message"
        ),
        timeout=240,
        what="gamma's round-1 receipt to be sent",
        watch=watch,
        poll_s=0.02,
    )
    os.kill(victim.process.pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: _supernode_log_shows(
                supernode_log, round_number=2, step="Receiving: train message"
            ),
            timeout=120,
            what="gamma's SuperNode to take its round-2 task",
            watch=watch,
        )
        killed = _supernode_pid(victim)
        os.kill(killed, signal.SIGKILL)
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)

    assert coordinator.process.wait(timeout=300) == 0, coordinator.log()
    metrics = deployment.metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[1]["sites_ok"] == 3
    # Round 2 completed without gamma, and says so.
    assert metrics[2]["sites_ok"] == 2 and metrics[2]["sites_failed"] == 1
    assert "gamma" not in metrics[2]["sites"]
    (reason,) = metrics[2]["failures"].values()
    # The round timed out on it, Flower reported the node gone, or (killed while sending its
    # reply) Flower found the reply's upload cut off.
    assert any(
        sign in reason
        for sign in ("no reply within", "Node Unavailable", "Reply message objects are unavailable")
    ), reason
    # Gamma's SuperNode was started again, rejoined, and trained in round 3: round 2 ended
    # the moment gamma marked its old node offline, and the coordinator waited for it to
    # rejoin before drawing round 3 ([deployment] rejoin_wait_s).
    assert f"SuperNode (pid {killed}) exited" in victim.log()
    assert _supernode_pid(victim) != killed
    assert metrics[3]["sites"] == sorted(SITES)
    assert "Flower run status: finished/completed" in coordinator.log()
    assert main(["audit", "verify", str(deployment.run_dir)]) == 0
    for name, site in sites.items():
        assert site.process.poll() is None, f"{name} stopped:\n{site.log()}"
        supernode = _supernode_pid(site)
        assert deployment.stop(site) == 0  # SIGTERM: a clean stop
        assert not _alive(supernode)  # and its SuperNode is gone with it
    runs = list((deployment.root / "gamma/state/receipts").iterdir())  # one folder per run
    assert len(runs) == 1
    receipts = sorted(p.name for p in runs[0].iterdir())
    assert receipts == ["round-1-train.json", "round-3-train.json"]


def test_coordinator_killed_mid_run_resumes_with_the_ledger_intact(
    deployment: Deployment,
) -> None:
    coordinator = deployment.start_coordinator()
    sites = [deployment.start_site(name) for name in SITES]
    wait_for(
        lambda: _tasks_sent(deployment.run_dir, 2) == len(SITES),
        timeout=240,
        what="round 2 to be sent",
        watch=[coordinator, *sites],
    )
    deployment.stop(coordinator, sig=signal.SIGKILL)  # no clean-up: a crash
    before = read_entries(deployment.run_dir / "ledger.db")
    assert [m["round"] for m in deployment.metrics()] == [0, 1]

    resumed = deployment.start_coordinator(resume=True)

    assert resumed.process.wait(timeout=300) == 0, resumed.log()
    assert "resuming after round 1" in resumed.log()
    metrics = deployment.metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    after = read_entries(deployment.run_dir / "ledger.db")
    assert [e.entry_hash for e in after[: len(before)]] == [e.entry_hash for e in before]
    assert EntryKind.RUN_RESUMED in {e.kind for e in after[len(before) :]}
    assert after[-1].kind == EntryKind.RUN_FINISHED
    assert main(["audit", "verify", str(deployment.run_dir)]) == 0
    for site in sites:
        assert site.process.poll() is None, site.log()


def test_sigterm_stops_the_coordinator_and_every_process_it_started(
    deployment: Deployment,
) -> None:
    coordinator = deployment.start_coordinator()
    wait_for(
        lambda: "enrolled site gamma" in coordinator.log(),
        timeout=180,
        what="the coordinator to wait for its sites",
        watch=[coordinator],
    )
    children = [int(pid) for pid in re.findall(r"(?:nginx|SuperLink) pid (\d+)", coordinator.log())]
    assert len(children) == 2 and all(_alive(pid) for pid in children)
    (superlink,) = (int(pid) for pid in re.findall(r"SuperLink pid (\d+)", coordinator.log()))
    # Flower's telemetry and update check are off in the SuperLink the command started.
    environ = Path(f"/proc/{superlink}/environ").read_bytes().split(b"\0")
    assert b"FLWR_TELEMETRY_ENABLED=0" in environ
    assert b"FLWR_DISABLE_UPDATE_CHECK=1" in environ

    code = deployment.stop(coordinator)

    assert code == 130, coordinator.log()
    assert "received SIGTERM: stopped" in coordinator.log()
    assert not any(_alive(pid) for pid in children)
