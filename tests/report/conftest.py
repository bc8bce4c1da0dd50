"""A hand-made report input with two honest sites, one hostile site name and a rejection."""

from __future__ import annotations

import pytest

from fedsilo.report import (
    Fact,
    Outcome,
    Privacy,
    ReportData,
    RoundRow,
    SiteRow,
    UpdateRow,
    Verification,
)
from fedsilo.report.model import KeySource, RunStatus

HOSTILE_SITE = "<script>alert(1)</script>"
REJECTION_REASON = 'tensor "lora_A" has shape (4, 8), expected (8, 8) & was refused'
ADAPTER_HASHES = (
    "0a" * 32,
    "1b" * 32,
    "2c" * 32,
)


def make_report_data(
    *,
    verify_ok: bool = True,
    problems: tuple[str, ...] = (),
    epsilon: dict[str, tuple[tuple[int, float], ...]] | None = None,
    delta: float | None = None,
    status: RunStatus = "completed",
    key_source: KeySource = "auditor",
) -> ReportData:
    """A small, complete ``ReportData``; every string in it is distinct so tests can find it."""
    sites = (
        SiteRow(name="st-mary", fingerprint="SHA256:stmary-fp-3f9a", accepted=2, rejected=0),
        SiteRow(name="county-general", fingerprint="SHA256:county-fp-77c1", accepted=2, rejected=0),
        SiteRow(name=HOSTILE_SITE, fingerprint="SHA256:hostile-fp-0bad", accepted=1, rejected=1),
    )
    rounds = (
        RoundRow(
            0, 0, 0, (), None, None, 0.125, 0.25, 3.5, 8, ADAPTER_HASHES[0], metrics_ledgered=True
        ),
        RoundRow(
            1,
            3,
            0,
            ("st-mary", "county-general"),
            24,
            2.75,
            0.25,
            0.5,
            2.9,
            8,
            ADAPTER_HASHES[1],
            metrics_ledgered=True,
        ),
        RoundRow(
            2, 2, 1, ("st-mary",), 16, 2.1, 0.375, 0.625, 2.4, 8, "2c" * 32, metrics_ledgered=True
        ),
    )
    updates = (
        UpdateRow(1, "st-mary", True, "sha256:payload-stmary-r1", 40_960),
        UpdateRow(1, "county-general", True, "sha256:payload-county-r1", 40_960),
        UpdateRow(1, HOSTILE_SITE, True, "sha256:payload-hostile-r1", 40_960),
        UpdateRow(2, "st-mary", True, "sha256:payload-stmary-r2", 40_960),
        UpdateRow(2, "county-general", True, "sha256:payload-county-r2", None),
        UpdateRow(2, HOSTILE_SITE, False, REJECTION_REASON, 12),
    )
    return ReportData(
        run_name="cardio-pilot",
        run_kind="federated run",
        generated_at="2024-05-01T12:00:00Z",
        verification=Verification(
            ok=verify_ok,
            summary="ledger of 6 entries checked" if verify_ok else "ledger check failed",
            problems=problems,
            first_broken=problems[0] if problems else None,
            key_source=key_source,
            coordinator_fingerprint="SHA256:coordinator-fp-c0de",
            entries=6,
            site_key_source=key_source,
        ),
        outcome=Outcome(
            status=status,
            reason="FederationError: round 2: fewer than min_sites" if status == "failed" else None,
            rounds_done=2,
            rounds_planned=2,
        ),
        facts=(
            Fact("Federation id", "fed-2024-cardio-0001", True),
            Fact("Base model hash", "basemodel" + "e" * 55, True),
            Fact("Configuration digest", "configdigest" + "f" * 52, True),
            Fact("Strategy", "fedavg (min_sites=2)"),
        ),
        privacy=Privacy(
            mode="record-level" if epsilon else "none",
            accountant="rdp" if epsilon else None,
            delta=delta,
            secure_aggregation="none",
            epsilon=epsilon or {},
        ),
        sites=sites,
        rounds=rounds,
        updates=updates,
        metric="code",
        metric_note="first word as an ICD-10-CM code.",
    )


@pytest.fixture
def report_data() -> ReportData:
    return make_report_data()
