"""The numbers a site reports with its update are its signed word: changed on the way, they are
rejected at the coordinator; changed in the ledger afterwards, they fail the audit.

Each coordinator-side test makes site 0 (the first to answer) send honest, signed claims and
then changes what travels beside them, as a relay or a compromised coordinator could.
"""

import dataclasses
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import read_private_key
from fedsilo.ledger import Entry, EntryKind, JsonValue, Ledger, read_entries
from fedsilo.privacy.secagg.messages import MASKED_STAGE
from fedsilo.protocol.he_records import ENCRYPTED_MESSAGE, ENCRYPTED_STAGE
from fedsilo.protocol.records import (
    CLAIMS_KEY,
    DP_EVENT_KEY,
    METRICS_KEY,
    SITE_KEY,
    SiteMetrics,
    binding_from_record,
)
from fedsilo.protocol.secagg_records import MASKED_MESSAGE
from fedsilo.server.membership import load_membership
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import InProcessGrid
from fedsilo.simulation.sites import SimulatedSites

from .conftest import run_with_grid
from .test_hostile_updates import misbehaving


def _dp_config(make_config: Callable[..., FedsiloConfig]) -> FedsiloConfig:
    privacy = {"record_level": True, "max_grad_norm": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}
    return make_config(run={"rounds": 1}, privacy=privacy)


def _run_with_tampered_site(
    config: FedsiloConfig, run_dir: Path, change: Callable[[Message], None]
) -> tuple[str, dict[str, str]]:
    """Run one round in which site 0's reply goes through ``change``; (site 0, failures)."""
    tampered: list[str] = []

    def tamper(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        tampered.append(sites.site_for(context).name)
        change(reply)
        return reply

    run_with_grid(config, run_dir, misbehaving(tamper))
    [_, round_one] = RunFolder(run_dir).read_metrics()
    assert round_one["sites_ok"] == 2
    [site] = tampered
    return site, dict(round_one["failures"])


def _ledgered_rejections(run_dir: Path) -> dict[str, str]:
    return {
        str(entry.payload["sender"]): str(entry.payload["reason"])
        for entry in read_entries(run_dir / "ledger.db")
        if entry.kind is EntryKind.UPDATE_REJECTED
    }


def test_num_examples_changed_after_signing_is_rejected_naming_the_site(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # Ten times the site's weight in the mean, well under federation.max_site_examples.
    def inflate(reply: Message) -> None:
        metrics = SiteMetrics.from_record(reply.content.metric_records[METRICS_KEY])
        more = dataclasses.replace(metrics, num_examples=10 * metrics.num_examples)
        reply.content.metric_records[METRICS_KEY] = more.to_record()

    config = make_config(run={"rounds": 1})
    site, failures = _run_with_tampered_site(config, tmp_path / "run", inflate)

    assert list(failures) == [site]
    assert failures[site].startswith(f"the metrics and DP event received are not the ones {site}")
    assert _ledgered_rejections(tmp_path / "run") == failures


def test_dp_event_changed_after_signing_is_rejected_naming_the_site(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # More noise than the site used: still a valid event for the round, and a smaller epsilon.
    def understate(reply: Message) -> None:
        event = dict(reply.content.config_records[DP_EVENT_KEY])
        event["noise_multiplier"] = 2 * float(event["noise_multiplier"])  # type: ignore[arg-type]
        reply.content.config_records[DP_EVENT_KEY] = ConfigRecord(event)

    site, failures = _run_with_tampered_site(_dp_config(make_config), tmp_path / "run", understate)

    assert list(failures) == [site]
    assert failures[site].startswith(f"the metrics and DP event received are not the ones {site}")
    assert _ledgered_rejections(tmp_path / "run") == failures


def test_reply_without_signed_claims_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def strip(reply: Message) -> None:
        del reply.content.config_records[CLAIMS_KEY]

    config = make_config(run={"rounds": 1})
    site, failures = _run_with_tampered_site(config, tmp_path / "run", strip)

    assert failures == {site: "the update carries no signed claims (metrics, DP event)"}


def _understate_noise(reply: Message) -> None:
    """More noise than the site used: still a valid event for the round, and a smaller epsilon."""
    event = dict(reply.content.config_records[DP_EVENT_KEY])
    event["noise_multiplier"] = 2 * float(event["noise_multiplier"])  # type: ignore[arg-type]
    reply.content.config_records[DP_EVENT_KEY] = ConfigRecord(event)


@pytest.mark.parametrize(
    ("secure", "message_type", "stage"),
    [
        pytest.param({"mode": "secagg"}, MASKED_MESSAGE, MASKED_STAGE, id="secagg"),
        pytest.param(
            {"mode": "he", "he_poly_modulus_degree": 4096},
            ENCRYPTED_MESSAGE,
            ENCRYPTED_STAGE,
            id="he",
        ),
    ],
)
def test_secure_input_whose_dp_event_was_changed_is_rejected_naming_the_site(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    secure: dict[str, object],
    message_type: str,
    stage: str,
) -> None:
    tampered: list[str] = []

    class TamperingGrid(InProcessGrid):
        """Changes the DP event beside the first site's signed input on its way to the server."""

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            replies = list(super().pull_messages(message_ids))
            for reply in replies:
                if reply.metadata.message_type == message_type and not tampered:
                    binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
                    tampered.append(binding.site_id)
                    _understate_noise(reply)
            return replies

    config = make_config(
        run={"rounds": 1},
        privacy={"record_level": True, "noise_multiplier": 1.0},
        secure_aggregation=secure,
    )

    run_with_grid(config, tmp_path / "run", grid_class=TamperingGrid)

    [_, record] = RunFolder(tmp_path / "run").read_metrics()
    [site] = tampered
    assert record["sites_ok"] == 2
    assert list(record["failures"]) == [site]
    assert record["failures"][site].startswith(
        f"{stage}: the metrics and DP event received are not the ones {site} signed"
    )
    assert _ledgered_rejections(tmp_path / "run") == record["failures"]


def _rewrite_ledger(run_dir: Path, edit: Callable[[Entry], dict[str, JsonValue]]) -> None:
    """Rebuild the run's ledger with the coordinator's own key, each payload through ``edit``:
    what a coordinator that keeps its key could do after the fact."""
    membership = load_membership(RunFolder(run_dir).membership_path)
    key = read_private_key(membership.coordinator_key_path, passphrase=None)
    entries = read_entries(run_dir / "ledger.db")
    times = iter([entry.created_at for entry in entries])
    forged = run_dir / "forged" / "ledger.db"
    with Ledger.open(forged, coordinator_key=key, clock=lambda: next(times)) as ledger:
        for entry in entries:
            ledger.append(entry.kind, edit(entry))
    shutil.move(forged, run_dir / "ledger.db")
    shutil.rmtree(forged.parent)


@pytest.mark.parametrize("field", ["dp_event", "site_metrics"])
def test_ledger_edited_after_the_fact_fails_audit_verify(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
) -> None:
    run_dir = tmp_path / "run"
    run_with_grid(_dp_config(make_config), run_dir)
    assert main(["audit", "verify", str(run_dir)]) == 0
    first = next(
        e for e in read_entries(run_dir / "ledger.db") if e.kind is EntryKind.UPDATE_RECEIVED
    )
    site = first.payload["site_id"]

    def edit(entry: Entry) -> dict[str, JsonValue]:
        if entry.seq != first.seq:
            return entry.payload
        claimed = entry.payload[field]
        assert isinstance(claimed, dict)
        changed = "noise_multiplier" if field == "dp_event" else "seconds"
        return {**entry.payload, field: {**claimed, changed: 100.0}}

    _rewrite_ledger(run_dir, edit)
    # The auditor has no site's receipts (they would name the original entry hashes).
    for receipts in run_dir.glob("sites/*/receipts"):
        shutil.rmtree(receipts)
    capsys.readouterr()

    assert main(["audit", "verify", str(run_dir)]) == 1

    output = capsys.readouterr().out
    assert (
        f"entry {first.seq}: site {site!r}: the ledgered site_metrics and dp_event are not the "
        "ones the site signed"
    ) in output
