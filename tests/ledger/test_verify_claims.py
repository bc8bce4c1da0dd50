"""The audit holds each update entry's metrics and DP event to the site's signature on them."""

from pathlib import Path

import pytest

from fedsilo.crypto import UpdateBinding, claims_sha256, encode_signature, sign_claims
from fedsilo.ledger import UPDATE_BINDING_FIELDS, JsonValue, verify_ledger
from tests.ledger import COORDINATOR_KEY, SITE_ID, SITE_KEY, SITE_KEYS, UPDATE_SEQ, record_run
from tests.ledger import update_payload as honest_update

DP_EVENT: dict[str, JsonValue] = {
    "type": "poisson_gaussian",
    "noise_multiplier": 1.5,
    "sampling_rate": 0.25,
    "steps": 2,
}


def private_update() -> dict[str, JsonValue]:
    """An update entry of a record-level DP round: withheld metrics and a DP event, signed."""
    update = honest_update()
    binding = UpdateBinding(**{k: update[k] for k in UpdateBinding.__dataclass_fields__})  # type: ignore[arg-type]
    metrics: dict[str, JsonValue] = {
        "num_examples": 1,
        "train_loss": None,
        "tokens": 0,
        "seconds": 0.0,
        "precision": "fp32",
        "padding_share": None,
    }
    digest = claims_sha256(metrics=metrics, dp_event=DP_EVENT)
    signature = encode_signature(sign_claims(SITE_KEY, binding, digest))
    return {
        **update,
        "num_examples": 1,
        "site_metrics": metrics,
        "dp_event": dict(DP_EVENT),
        "site_claims": {"claims_sha256": digest, "signature": signature},
    }


def reasons_at_update(path: Path) -> list[str]:
    report = verify_ledger(path, coordinator_key=COORDINATOR_KEY.public_key(), site_keys=SITE_KEYS)
    assert all(problem.seq == UPDATE_SEQ for problem in report.problems)
    return [problem.reason for problem in report.problems]


def test_signed_claims_verify(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db", update=private_update())

    assert reasons_at_update(tmp_path / "ledger.db") == []


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({"noise_multiplier": 3.0}, id="more noise claimed"),
        pytest.param({"sampling_rate": 0.125}, id="smaller sampling rate claimed"),
        pytest.param({"steps": 1}, id="fewer steps claimed"),
    ],
)
def test_dp_event_the_site_did_not_sign_is_caught(
    tmp_path: Path, edit: dict[str, JsonValue]
) -> None:
    # The coordinator ledgers (and signs into its chain) a DP event that understates epsilon.
    update = private_update()
    update["dp_event"] = {**DP_EVENT, **edit}
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(f"site {SITE_ID!r}: the ledgered site_metrics and dp_event are not")


def test_dropped_dp_event_is_caught(tmp_path: Path) -> None:
    update = private_update()
    update["dp_event"] = None
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert "not the ones the site signed" in reason


def test_metrics_the_site_did_not_sign_are_caught(tmp_path: Path) -> None:
    update = honest_update()
    metrics = update["site_metrics"]
    assert isinstance(metrics, dict)
    update["site_metrics"] = {**metrics, "num_examples": 640}
    update["num_examples"] = 640
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(f"site {SITE_ID!r}: the ledgered site_metrics and dp_event are not")


def test_num_examples_beside_the_signed_metrics_must_match_them(tmp_path: Path) -> None:
    update = honest_update()
    update["num_examples"] = 640
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason == f"site {SITE_ID!r}: num_examples is not the count in the site's signed metrics"


def test_claims_signed_by_another_key_are_caught(tmp_path: Path) -> None:
    update = private_update()
    claims = update["site_claims"]
    assert isinstance(claims, dict)
    binding = UpdateBinding(**{k: update[k] for k in UpdateBinding.__dataclass_fields__})  # type: ignore[arg-type]
    forged = sign_claims(COORDINATOR_KEY, binding, str(claims["claims_sha256"]))
    update["site_claims"] = {**claims, "signature": encode_signature(forged)}
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(f"site {SITE_ID!r} signed claims signature is invalid")


def test_entry_without_signed_claims_names_its_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As written before sites signed their claims: binding, signature, DP event, no claims.
    # Today's store refuses to write such an entry, so the older writer's check stands in.
    monkeypatch.setattr(
        "fedsilo.ledger.store.UPDATE_ENTRY_FIELDS", (*UPDATE_BINDING_FIELDS, "site_signature")
    )
    update = private_update()
    del update["site_claims"], update["site_metrics"]
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(f"update from site {SITE_ID!r} is in update entry format 1")
    assert "needs format 2" in reason


@pytest.mark.parametrize(
    ("federation_id", "run_id"),
    [
        pytest.param("fed-1", "run-0", id="another run"),
        pytest.param("fed-0", "run-1", id="another federation"),
    ],
)
def test_a_genuine_update_signed_for_another_run_is_caught(
    tmp_path: Path, federation_id: str, run_id: str
) -> None:
    # The site really signed it, binding, policy and claims: for another run of the federation
    # (or another federation), whose update a coordinator chains into this ledger.
    update = honest_update(federation_id=federation_id, run_id=run_id)
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(
        f"site {SITE_ID!r} signed this update for federation {federation_id!r}, run {run_id!r}"
    )
    assert "run_started entry records federation 'fed-1', run 'run-1'" in reason


def test_signed_claims_without_the_policy_declaration_are_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every writer of site_claims also wrote site_policy; today's store refuses an entry
    # without it, so the check is lifted to write the entry a tamperer would.
    monkeypatch.setattr(
        "fedsilo.ledger.store.UPDATE_ENTRY_FIELDS",
        (*UPDATE_BINDING_FIELDS, "site_signature", "site_claims"),
    )
    update = private_update()
    del update["site_policy"]
    record_run(tmp_path / "ledger.db", update=update)

    [reason] = reasons_at_update(tmp_path / "ledger.db")

    assert reason.startswith(f"site {SITE_ID!r} policy declaration is missing (site_policy)")
