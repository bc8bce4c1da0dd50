"""A hand-made report input with two honest sites, one hostile site name and a rejection."""

from __future__ import annotations

import pytest

from fedsilo.report import ReportData, RoundRow, SiteRow, UpdateRow

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
) -> ReportData:
    """A small, complete ``ReportData``; every string in it is distinct so tests can find it."""
    sites = (
        SiteRow(name="st-mary", fingerprint="SHA256:stmary-fp-3f9a", accepted=2, rejected=0),
        SiteRow(name="county-general", fingerprint="SHA256:county-fp-77c1", accepted=2, rejected=0),
        SiteRow(name=HOSTILE_SITE, fingerprint="SHA256:hostile-fp-0bad", accepted=1, rejected=1),
    )
    rounds = (
        RoundRow(0, 0, 0, None, 0.125, 0.25, 3.5, ADAPTER_HASHES[0]),
        RoundRow(1, 3, 0, 2.75, 0.25, 0.5, 2.9, ADAPTER_HASHES[1]),
        RoundRow(2, 2, 1, 2.1, 0.375, 0.625, 2.4, ADAPTER_HASHES[2]),
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
        federation_id="fed-2024-cardio-0001",
        generated_at="2024-05-01T12:00:00Z",
        base_model_hash="basemodel" + "e" * 55,
        config_digest="configdigest" + "f" * 52,
        coordinator_fingerprint="SHA256:coordinator-fp-c0de",
        strategy="fedavg (min_sites=2)",
        privacy_summary="no differential privacy configured" if not epsilon else "DP-FedAvg",
        verify_ok=verify_ok,
        verify_summary="ledger of 6 entries checked" if verify_ok else "ledger check failed",
        verify_problems=problems,
        sites=sites,
        rounds=rounds,
        updates=updates,
        epsilon=epsilon or {},
        delta=delta,
    )


@pytest.fixture
def report_data() -> ReportData:
    return make_report_data()
