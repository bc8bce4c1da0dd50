"""Offline audit of a ledger: is every entry there, in order, unedited and really signed?

The auditor pins the coordinator's public key out of band (never taking it from the ledger
itself) and knows each site's public key. Per entry, in this order:

1. ``seq`` follows the previous entry's seq by one (the first is 1): nothing deleted or moved;
2. ``prev_hash`` is the previous entry's ``entry_hash`` (``GENESIS_HASH`` for the first);
3. ``entry_hash`` recomputes from the entry's fields (recipe in :mod:`fedsilo.ledger.entries`);
4. the coordinator's signature over ``(entry_hash, seq)`` verifies under the pinned key;
5. the first entry is ``run_started``;
6. an ``update_received`` entry carries the site's update binding and ``site_signature``, the
   binding names the federation and run of the ledger's ``run_started`` entry (a site's genuine
   update from another run cannot be chained into this one), the site is known, and its
   signature verifies; its ``site_policy`` (the policy the site declared) carries the site's
   valid signature over the declaration and the same binding; its ``site_claims`` carries the
   site's valid signature over the same binding and ``claims_sha256``, and that digest
   recomputes from the entry's ``site_metrics`` and ``dp_event`` (so the metrics that weighted
   the update and the DP event its privacy is accounted by are what the site signed; a
   ``num_examples`` beside them must equal the signed one). An entry without ``site_claims``
   (update entry format 1, written before sites signed their claims) is a problem: its numbers
   rest on nobody's signature. An entry with ``site_claims`` must carry ``site_policy`` too:
   every writer of claims also wrote the declaration, so one without it had it removed.

Every problem is collected, not just the first; then caller-supplied extra checks run (the
server adds one that compares aggregate digests with the checkpoints on disk). Extra checks see
only the entries that passed every check above: what they read on disk is named by entries the
pinned key vouches for, never by an entry anyone could have written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsilo.crypto import (
    PublicKey,
    SignatureError,
    UpdateBinding,
    claims_sha256,
    decode_signature,
    fingerprint,
    public_key_text,
    verify_claims,
    verify_policy_declaration,
    verify_update,
)
from fedsilo.ledger.entries import (
    GENESIS_HASH,
    SITE_CLAIMS_FIELD,
    SITE_METRICS_FIELD,
    SITE_POLICY_FIELD,
    SITE_SIGNATURE_FIELD,
    UPDATE_BINDING_FIELDS,
    Entry,
    EntryKind,
    recomputed_hash,
    verify_entry_signature,
)
from fedsilo.ledger.store import (
    LedgerError,
    key_fingerprint_text,
    parse_row,
    read_stored_ledger,
)


@dataclass(frozen=True)
class VerifyProblem:
    """One thing wrong with a ledger; ``seq`` is None for a problem of the ledger as a whole."""

    seq: int | None
    reason: str


ExtraCheck = Callable[[Sequence[Entry]], list[VerifyProblem]]
"""A further check over the verified entries, returning its problems (empty when it passes)."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of an audit.

    ``problems`` are ordered with whole-ledger problems (``seq`` None) first, then by seq, and
    in check order within one entry. ``coordinator_fingerprint`` is that of the pinned key
    the ledger was checked against.
    """

    entries: int
    problems: tuple[VerifyProblem, ...]
    coordinator_fingerprint: str
    receipts: int | None = None
    """How many site receipt files were examined; None where the verification looked for none
    (the ledger alone)."""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def first_problem(self) -> VerifyProblem | None:
        """The earliest problem (whole-ledger ones first, then by seq), or None."""
        return self.problems[0] if self.problems else None


def _ordered(problems: list[VerifyProblem]) -> tuple[VerifyProblem, ...]:
    # sorted() is stable, so the check order within one entry is kept.
    return tuple(sorted(problems, key=lambda p: (p.seq is not None, p.seq or 0)))


def _binding_of(entry: Entry) -> tuple[UpdateBinding, str] | str:
    """The site's binding and signature text from an update entry, or why they are not there."""
    payload = entry.payload
    missing = [
        name for name in (*UPDATE_BINDING_FIELDS, SITE_SIGNATURE_FIELD) if name not in payload
    ]
    if missing:
        return f"update_received payload lacks {', '.join(missing)}"
    wrong = [
        name
        for name in (*UPDATE_BINDING_FIELDS, SITE_SIGNATURE_FIELD)
        if name != "round" and not isinstance(payload[name], str)
    ]
    round_value = payload["round"]
    if isinstance(round_value, bool) or not isinstance(round_value, int):
        wrong.append("round")
    if wrong or not isinstance(round_value, int):
        return f"update_received payload fields of the wrong type: {', '.join(wrong)}"
    binding = UpdateBinding(
        federation_id=str(payload["federation_id"]),
        run_id=str(payload["run_id"]),
        round=round_value,
        stage=str(payload["stage"]),
        site_id=str(payload["site_id"]),
        payload_sha256=str(payload["payload_sha256"]),
    )
    return binding, str(payload[SITE_SIGNATURE_FIELD])


def _run_problem(binding: UpdateBinding, started: Mapping[str, object] | None) -> str | None:
    """Why ``binding`` does not belong to the run the ledger's run_started entry (payload
    ``started``) records (None: it does). A site signs each update for one federation and run,
    so its signature alone cannot stop a genuine update of another run being chained here."""
    if started is None:
        return "no run_started entry records the federation and run this update must belong to"
    expected = (started.get("federation_id"), started.get("run_id"))
    if not all(isinstance(value, str) for value in expected):
        return (
            "the run_started entry records no federation_id and run_id (as text) to hold this "
            "update's signed binding to"
        )
    if (binding.federation_id, binding.run_id) != expected:
        return (
            f"site {binding.site_id!r} signed this update for federation "
            f"{binding.federation_id!r}, run {binding.run_id!r}, but this ledger's run_started "
            f"entry records federation {expected[0]!r}, run {expected[1]!r}: an update of "
            "another run"
        )
    return None


def _update_problems(
    entry: Entry, site_keys: Mapping[str, PublicKey], started: Mapping[str, object] | None
) -> list[VerifyProblem]:
    found = _binding_of(entry)
    if isinstance(found, str):
        return [VerifyProblem(entry.seq, found)]
    binding, signature_text = found
    problems: list[str | None] = [_run_problem(binding, started)]
    site_key = site_keys.get(binding.site_id)
    if site_key is None:
        problems.append(f"update from unknown site {binding.site_id!r}")
    else:
        try:
            verify_update(site_key, binding, decode_signature(signature_text))
        except SignatureError as error:
            problems.append(f"site {binding.site_id!r} signature on the update is invalid: {error}")
        else:
            problems += [
                _policy_problem(entry.payload, site_key, binding),
                _claims_problem(entry.payload, site_key, binding),
            ]
    return [VerifyProblem(entry.seq, problem) for problem in problems if problem is not None]


def _claims_problem(
    payload: Mapping[str, object], site_key: PublicKey, binding: UpdateBinding
) -> str | None:
    """Why an entry's ``site_metrics`` and ``dp_event`` are not what the site signed (None:
    they are)."""
    site = binding.site_id
    claims = payload.get(SITE_CLAIMS_FIELD)
    if claims is None:
        return (
            f"update from site {site!r} is in update entry format 1 (no {SITE_CLAIMS_FIELD}: "
            "written before sites signed their metrics and DP event); this verifier needs "
            "format 2, so the entry's metrics and DP event cannot be checked against the "
            "site's signature"
        )
    what = f"site {site!r} signed claims"
    if not isinstance(claims, dict) or set(claims) != {"claims_sha256", "signature"}:
        return f"{what} must hold exactly claims_sha256 and signature"
    digest, signature = claims["claims_sha256"], claims["signature"]
    if not isinstance(digest, str) or not isinstance(signature, str):
        return f"{what} fields of the wrong type"
    try:
        verify_claims(site_key, binding, digest, decode_signature(signature))
    except SignatureError as error:
        return f"{what} signature is invalid: {error}"
    metrics, dp_event = payload.get(SITE_METRICS_FIELD), payload.get("dp_event")
    if not isinstance(metrics, dict | None) or not isinstance(dp_event, dict | None):
        return f"site {site!r}: {SITE_METRICS_FIELD} and dp_event must each be an object or null"
    try:
        recomputed = claims_sha256(metrics=metrics, dp_event=dp_event)
    except (TypeError, ValueError) as error:
        return f"site {site!r}: {SITE_METRICS_FIELD} or dp_event cannot be encoded: {error}"
    if recomputed != digest:
        return (
            f"site {site!r}: the ledgered {SITE_METRICS_FIELD} and dp_event are not the ones the "
            f"site signed (claims sha256 {recomputed}, signed {digest}); edited after receipt"
        )
    if "num_examples" in payload and (
        metrics is None or payload["num_examples"] != metrics.get("num_examples")
    ):
        return f"site {site!r}: num_examples is not the count in the site's signed metrics"
    return None


def _policy_problem(
    payload: Mapping[str, object], site_key: PublicKey, binding: UpdateBinding
) -> str | None:
    """Why an entry's ``site_policy`` is not the site's signed declaration (None: it is, or the
    entry is of format 1, which predates declarations, and has none)."""
    declared = payload.get(SITE_POLICY_FIELD)
    what = f"site {binding.site_id!r} policy declaration"
    if declared is None:
        if SITE_CLAIMS_FIELD not in payload:
            return None  # format 1: reported as such by the claims check
        # Sites declared their policy before they signed claims: a format-2 entry without a
        # declaration had it removed, and the report would call the site's policy unknown.
        return (
            f"{what} is missing ({SITE_POLICY_FIELD}): an entry with {SITE_CLAIMS_FIELD} "
            "always carries the site's signed declaration"
        )
    if not isinstance(declared, dict) or set(declared) != {
        "policy_sha256",
        "min_cohort",
        "signature",
    }:
        return f"{what} must hold exactly policy_sha256, min_cohort and signature"
    digest, cohort, signature = (
        declared["policy_sha256"],
        declared["min_cohort"],
        declared["signature"],
    )
    if (
        not isinstance(digest, str)
        or isinstance(cohort, bool)
        or not isinstance(cohort, int)
        or not isinstance(signature, str)
    ):
        return f"{what} fields of the wrong type"
    fields: dict[str, str | int] = {"policy_sha256": digest, "min_cohort": cohort}
    try:
        verify_policy_declaration(site_key, binding, fields, decode_signature(signature))
    except SignatureError as error:
        return f"{what} signature is invalid: {error}"
    return None


def _entry_problems(
    entry: Entry, previous: Entry | None, coordinator_key: PublicKey
) -> list[VerifyProblem]:
    """Checks 1-5 of the module docstring for one entry."""
    problems: list[VerifyProblem] = []
    expected_seq = 1 if previous is None else previous.seq + 1
    if entry.seq != expected_seq:
        problems.append(
            VerifyProblem(
                entry.seq,
                f"seq {entry.seq} where {expected_seq} was expected "
                "(an entry is missing, duplicated or out of order)",
            )
        )
    expected_prev = GENESIS_HASH if previous is None else previous.entry_hash
    if entry.prev_hash != expected_prev:
        after = "the genesis hash" if previous is None else f"entry seq {previous.seq}'s hash"
        problems.append(VerifyProblem(entry.seq, f"prev_hash is not {after}"))
    try:
        hash_matches = recomputed_hash(entry) == entry.entry_hash
    except ValueError as error:
        problems.append(VerifyProblem(entry.seq, f"entry cannot be hashed: {error}"))
    else:
        if not hash_matches:
            problems.append(
                VerifyProblem(entry.seq, "entry_hash does not match the entry's fields (edited)")
            )
    try:
        verify_entry_signature(coordinator_key, entry)
    except SignatureError as error:
        problems.append(VerifyProblem(entry.seq, f"coordinator signature does not verify: {error}"))
    if previous is None and entry.kind is not EntryKind.RUN_STARTED:
        problems.append(
            VerifyProblem(
                entry.seq, f"the first entry is {entry.kind}, not {EntryKind.RUN_STARTED}"
            )
        )
    return problems


def _chain_problems(
    entries: Sequence[Entry],
    coordinator_key: PublicKey,
    site_keys: Mapping[str, PublicKey],
) -> list[VerifyProblem]:
    problems: list[VerifyProblem] = []
    previous: Entry | None = None
    started = next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), None)
    for entry in entries:
        problems.extend(_entry_problems(entry, previous, coordinator_key))
        if entry.kind is EntryKind.UPDATE_RECEIVED:
            problems.extend(_update_problems(entry, site_keys, started))
        previous = entry
    return problems


def _verified(entries: Sequence[Entry], problems: list[VerifyProblem]) -> list[Entry]:
    """The entries with no problem of their own (extra checks read files only for these)."""
    flawed = {problem.seq for problem in problems}
    return [entry for entry in entries if entry.seq not in flawed]


def verify_entries(
    entries: Sequence[Entry],
    *,
    coordinator_key: PublicKey,
    site_keys: Mapping[str, PublicKey],
    extra_checks: Sequence[ExtraCheck] = (),
) -> VerifyReport:
    """Audit ``entries`` (in ledger order) against the pinned coordinator key and site keys.

    Returns a report of every problem found; an empty ledger is a problem too. The checks are
    listed in the module docstring; ``extra_checks`` run afterwards on the same entries.
    """
    problems = _chain_problems(entries, coordinator_key, site_keys)
    if not entries:
        problems.append(VerifyProblem(None, "the ledger has no entries"))
    verified = _verified(entries, problems)
    for check in extra_checks:
        problems.extend(check(verified))
    return VerifyReport(
        entries=len(entries),
        problems=_ordered(problems),
        coordinator_fingerprint=fingerprint(coordinator_key),
    )


def verify_ledger(
    path: Path,
    *,
    coordinator_key: PublicKey,
    site_keys: Mapping[str, PublicKey],
    extra_checks: Sequence[ExtraCheck] = (),
) -> VerifyReport:
    """Audit the ledger file at ``path``, opened read-only (see :func:`verify_entries`).

    Beyond the per-entry checks, a stored row that cannot be read as an entry (unknown kind,
    a payload that is not canonical JSON) is a problem at its seq, and so is a ledger whose
    recorded coordinator key is not the pinned one. Raises LedgerError only when the file is
    missing or not a ledger at all.
    """
    stored = read_stored_ledger(Path(path))
    problems: list[VerifyProblem] = []
    if stored.coordinator_key_text != public_key_text(coordinator_key):
        problems.append(
            VerifyProblem(
                None,
                f"the ledger was written for coordinator key "
                f"{key_fingerprint_text(stored.coordinator_key_text)}, but the pinned key is "
                f"{fingerprint(coordinator_key)}",
            )
        )
    entries: list[Entry] = []
    for row in stored.rows:
        try:
            entries.append(parse_row(row))
        except LedgerError as error:
            problems.append(VerifyProblem(row.number, str(error)))
    if not stored.rows:
        problems.append(VerifyProblem(None, "the ledger has no entries"))
    problems.extend(_chain_problems(entries, coordinator_key, site_keys))
    verified = _verified(entries, problems)
    for check in extra_checks:
        problems.extend(check(verified))
    return VerifyReport(
        entries=len(stored.rows),
        problems=_ordered(problems),
        coordinator_fingerprint=fingerprint(coordinator_key),
    )
