"""Auditing a run folder offline: the ledger against its keys, and against the files on disk.

The ledger's own checks (chain, coordinator signatures, site signatures) are in
``fedsilo.ledger``. This module adds what needs the run folder: each checkpoint's adapter file
must hash to what the ledger recorded for that round (the initial adapter in ``run_started``,
the last ``round_aggregated`` entry of every later round, the final adapter in
``run_finished``), and no checkpoint may exist that the ledger does not account for; the
site keys and ids of ``federation.json`` must be the ones ``run_started`` records (and the
auditor's own, where they pin them).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsilo.crypto import (
    PublicKey,
    Receipt,
    SignatureError,
    UpdateBinding,
    decode_signature,
    fingerprint,
    read_public_key,
    verify_receipt,
)
from fedsilo.ledger import (
    UPDATE_BINDING_FIELDS,
    Entry,
    EntryKind,
    ExtraCheck,
    VerifyProblem,
    VerifyReport,
    verify_ledger,
)
from fedsilo.server.folder_checks import (
    UnsafeFileError,
    hash_file,
    links_out_of,
    outputs_match_ledger,
    read_bounded,
)
from fedsilo.server.lineage import lineage_matches_ledger
from fedsilo.server.membership import Membership, load_membership
from fedsilo.server.run_folder import SERVER_STATE_FILE, RunFolder

MAX_RECEIPT_BYTES = 64 * 1024
MAX_NESTING = 8
"""Deepest chain of runs naming runs (distillation -> clustered run -> cluster) verified."""

MAX_NESTED_RUNS = 256
"""Most distinct runs one audit verifies besides the one asked for (a distillation of a
clustered run of 100 clusters is about 100)."""


@dataclasses.dataclass
class _NestedRuns:
    """The runs one audit has verified on behalf of the run asked for: each once. A ledger
    can name the same source run many times at every level; verified anew each time, 3 names
    per level made a chain 4 deep cost 121 verifications, and the nesting limit allows 8."""

    reports: dict[tuple[Path, str], VerifyReport] = dataclasses.field(default_factory=dict)


def _recorded_adapters(entries: Sequence[Entry]) -> dict[int, tuple[int, str]]:
    """Round -> (seq, adapter sha256) as the ledger last recorded it."""
    recorded: dict[int, tuple[int, str]] = {}
    for entry in entries:
        if entry.kind is EntryKind.RUN_STARTED:
            recorded[0] = (entry.seq, str(entry.payload.get("initial_adapter_sha256")))
        elif entry.kind is EntryKind.ROUND_AGGREGATED:
            round_number = entry.payload.get("round")
            if isinstance(round_number, int):
                recorded[round_number] = (entry.seq, str(entry.payload.get("adapter_sha256")))
    return recorded


def _hash_or_none(path: Path) -> str | None:
    try:
        return hash_file(path)
    except UnsafeFileError:
        return None


def _server_state_problems(
    folder: RunFolder, round_number: int, entry: Entry
) -> list[VerifyProblem]:
    """The round's strategy state file against the digest its ``round_aggregated`` entry (at
    round 0 the ``baseline_evaluated`` one) records; ledgers written before that digest was
    recorded have none to check."""
    digest = entry.payload.get("server_state_sha256")
    recording = (EntryKind.ROUND_AGGREGATED, EntryKind.BASELINE_EVALUATED)
    if entry.kind not in recording or digest is None:
        return []
    path = folder.checkpoint_dir(round_number) / SERVER_STATE_FILE
    actual = _hash_or_none(path)
    if actual == digest:
        return []
    found = "cannot be read" if actual is None else f"hashes to {actual}"
    return [
        VerifyProblem(
            entry.seq,
            f"round {round_number}: the ledger records server state {digest}, but {path} {found}",
        )
    ]


def checkpoints_match_ledger(folder: RunFolder) -> ExtraCheck:
    """An extra ledger check: checkpoints on disk are exactly the adapters the ledger recorded."""

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        problems: list[VerifyProblem] = []
        recorded = _recorded_adapters(entries)
        entries_by_seq = {entry.seq: entry for entry in entries}
        baseline = next((e for e in entries if e.kind is EntryKind.BASELINE_EVALUATED), None)
        for round_number in folder.checkpoint_rounds():
            path = folder.checkpoint_dir(round_number) / "adapter.safetensors"
            if round_number not in recorded:
                problems.append(
                    VerifyProblem(None, f"checkpoint {path} is not recorded in the ledger")
                )
                continue
            seq, digest = recorded[round_number]
            try:
                actual = hash_file(path)
            except UnsafeFileError as error:
                problems.append(VerifyProblem(seq, f"round {round_number}: {error}"))
                continue
            if actual != digest:
                problems.append(
                    VerifyProblem(
                        seq,
                        f"round {round_number}: the ledger records adapter {digest}, but "
                        f"{path} hashes to {actual}",
                    )
                )
            state_entry = baseline if round_number == 0 else entries_by_seq[seq]
            if state_entry is not None:
                problems.extend(_server_state_problems(folder, round_number, state_entry))
        finished = [e for e in entries if e.kind is EntryKind.RUN_FINISHED]
        if folder.final_dir.exists() and not finished:
            # A chain cut short still verifies on its own; the final adapter on disk says
            # the run finished, so its last entries must be there.
            problems.append(
                VerifyProblem(
                    None,
                    f"{folder.final_dir} exists but the ledger has no run_finished entry: "
                    "entries may have been cut from its end",
                )
            )
        last_round = folder.latest_checkpoint_round()
        resumed_since = finished and any(
            e.kind is EntryKind.ROUND_AGGREGATED and e.seq > finished[-1].seq for e in entries
        )
        if finished and last_round is not None and not resumed_since:
            path = folder.checkpoint_dir(last_round) / "adapter.safetensors"
            digest = str(finished[-1].payload.get("final_adapter_sha256"))
            if _hash_or_none(path) != digest:
                problems.append(
                    VerifyProblem(
                        finished[-1].seq,
                        f"run_finished records final adapter {digest}, but the last "
                        f"checkpoint {path} differs",
                    )
                )
        return problems

    return check


def receipts_match_ledger(receipt_files: Sequence[Path], coordinator_key: PublicKey) -> ExtraCheck:
    """An extra ledger check: every receipt a site holds names an entry that is in the ledger.

    Receipts are the sites' own evidence: a ledger cut short, or rewritten after the fact,
    no longer contains the (seq, entry hash) the coordinator signed for them.
    """

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        by_seq = {entry.seq: entry for entry in entries}
        problems: list[VerifyProblem] = []
        for path in receipt_files:
            try:
                receipt, signature = _read_receipt(path)
                verify_receipt(coordinator_key, receipt, signature)
            except (ValueError, KeyError, TypeError, SignatureError, UnsafeFileError) as error:
                problems.append(VerifyProblem(None, f"receipt {path} is not valid: {error}"))
                continue
            entry = by_seq.get(receipt.ledger_seq)
            if entry is None or entry.entry_hash != receipt.entry_hash:
                problems.append(
                    VerifyProblem(
                        receipt.ledger_seq,
                        f"receipt {path} was signed for ledger entry {receipt.ledger_seq} "
                        f"with hash {receipt.entry_hash}, which the ledger does not hold",
                    )
                )
            elif _recorded_binding(entry) != receipt.binding.fields():
                # A receipt re-pointed at another entry: the update it acknowledges (site,
                # round, payload hash) must be the one that entry records.
                problems.append(
                    VerifyProblem(
                        receipt.ledger_seq,
                        f"receipt {path} acknowledges the update {receipt.binding.fields()}, "
                        f"but ledger entry {entry.seq} ({entry.kind}) records "
                        f"{_recorded_binding(entry) or 'no update'}",
                    )
                )
        return problems

    return check


def membership_matches_ledger(
    membership: Membership, pinned: Mapping[str, PublicKey] | None = None
) -> ExtraCheck:
    """An extra ledger check: ``federation.json`` (``membership``) names the federation, run and
    site keys that the ``run_started`` entry records, and, where the auditor pinned site keys
    (``pinned``), exactly those keys.

    The site signatures are checked against the run folder's keys (or the pinned ones): a
    ``federation.json`` whose keys differ from the fingerprints the coordinator signed into the
    ledger at the start is not the membership the run had.
    """

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        started = next((e for e in entries if e.kind is EntryKind.RUN_STARTED), None)
        problems: list[VerifyProblem] = []
        if pinned is not None:
            problems += _pinned_key_problems(membership, pinned)
        if started is None:
            return problems  # a missing or unverified run_started is reported already
        where = "federation.json"
        for field, value in (
            ("federation_id", membership.federation_id),
            ("run_id", membership.run_id),
        ):
            if started.payload.get(field) != value:
                problems.append(
                    VerifyProblem(
                        started.seq,
                        f"{where} names {field} {value!r}, but the run_started entry records "
                        f"{started.payload.get(field)!r}",
                    )
                )
        recorded = started.payload.get("sites")
        if not isinstance(recorded, dict):
            problems.append(
                VerifyProblem(started.seq, "the run_started entry records no site fingerprints")
            )
            return problems
        held = membership.fingerprints()
        for site in sorted(set(held) | set(recorded)):
            if held.get(site) != recorded.get(site):
                problems.append(
                    VerifyProblem(
                        started.seq,
                        f"site {site!r}: {where} pins the key "
                        f"{held.get(site, 'of no such site')}, but the run_started entry "
                        f"records {recorded.get(site, 'no such site')}",
                    )
                )
        return problems

    return check


def _pinned_key_problems(
    membership: Membership, pinned: Mapping[str, PublicKey]
) -> list[VerifyProblem]:
    """Every site of ``federation.json`` must have the key the auditor pinned for it."""
    problems: list[VerifyProblem] = []
    for site, key in sorted(membership.site_keys().items()):
        if site not in pinned:
            problems.append(
                VerifyProblem(
                    None,
                    f"site {site!r} is enrolled in federation.json, but no key of yours is "
                    "pinned for it (--site-keys): its updates cannot be checked against a key "
                    "you trust",
                )
            )
        elif fingerprint(pinned[site]) != fingerprint(key):
            problems.append(
                VerifyProblem(
                    None,
                    f"site {site!r}: federation.json pins the key {fingerprint(key)}, not the "
                    f"key {fingerprint(pinned[site])} you pinned",
                )
            )
    return problems


def _recorded_binding(entry: Entry) -> dict[str, object]:
    """The update binding an update_received entry records (empty for other kinds)."""
    if entry.kind is not EntryKind.UPDATE_RECEIVED:
        return {}
    return {name: entry.payload.get(name) for name in UPDATE_BINDING_FIELDS}


def _read_receipt(path: Path) -> tuple[Receipt, bytes]:
    """The receipt in ``path``; ValueError (or KeyError, TypeError) when it is not one.

    A site's file: any JSON may be in it, nested deep enough to exhaust the parser's stack.
    """
    try:
        data = json.loads(read_bounded(path, limit=MAX_RECEIPT_BYTES).decode("utf-8"))
    except RecursionError:
        raise ValueError("its JSON is nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("binding"), dict):
        raise ValueError("it is not a JSON object with a 'binding' object")
    ledger_seq = data.get("ledger_seq")
    if type(ledger_seq) is not int:
        raise ValueError(f"its ledger_seq is {ledger_seq!r}, not an integer")
    receipt = Receipt(
        binding=UpdateBinding(**data["binding"]),
        ledger_seq=ledger_seq,
        entry_hash=str(data["entry_hash"]),
    )
    return receipt, decode_signature(str(data["signature"]))


def verify_run(
    run_dir: Path,
    *,
    coordinator_key: PublicKey | None = None,
    site_keys: Mapping[str, PublicKey] | None = None,
    receipt_files: Sequence[Path] | None = None,
    _visiting: tuple[Path, ...] = (),
    _nested: _NestedRuns | None = None,
) -> VerifyReport:
    """Verify a run folder's ledger offline, with the checkpoints and the sites' receipts.

    ``coordinator_key`` is the key the auditor trusts, obtained out of band; without it the
    key pinned in RUN/federation.json is used (which only proves the ledger is consistent
    with the folder it came in, not who wrote it). ``site_keys`` likewise pins each site's key
    (site name -> key): the site signatures are then checked against these alone, and every
    site of federation.json must have one; without them the keys of RUN/federation.json are
    used, held to the fingerprints the run_started entry records. The report counts the
    receipt files examined. ``_visiting`` holds the runs whose verification asked for this one
    (a run naming itself, directly or not, is a problem).
    """
    folder = RunFolder(run_dir)
    membership = load_membership(folder.membership_path)
    trusted = coordinator_key or membership.coordinator_key()
    if receipt_files is None:
        # In simulation each site's storage is RUN/sites/NAME/, receipts included.
        # (RUN_ID/round-N-STAGE.json; older run folders hold the files without the run folder)
        receipt_files = sorted(
            [
                *folder.root.glob("sites/*/receipts/*.json"),
                *folder.root.glob("sites/*/receipts/*/*.json"),
            ]
        )
    visiting = (*_visiting, folder.root.resolve())
    nested = _NestedRuns() if _nested is None else _nested

    def not_followed(nested_dir: Path, key: PublicKey, why: str) -> VerifyReport:
        return VerifyReport(
            entries=0,
            problems=(VerifyProblem(None, f"{nested_dir} {why}; not followed"),),
            coordinator_fingerprint=fingerprint(key),
        )

    def verify_nested(nested_dir: Path, key: PublicKey) -> VerifyReport:
        # A cluster's run or a distillation's source run, under the key the auditor trusts.
        resolved = Path(nested_dir).resolve()
        if resolved in visiting or len(visiting) >= MAX_NESTING:
            return not_followed(
                nested_dir,
                key,
                f"refers back to a run that names it, or nests more than {MAX_NESTING} runs deep",
            )
        seen = (resolved, fingerprint(key))
        if seen not in nested.reports:
            if len(nested.reports) >= MAX_NESTED_RUNS:
                return not_followed(
                    nested_dir, key, f"would be run {MAX_NESTED_RUNS + 1} verified in this audit"
                )
            nested.reports[seen] = verify_run(
                nested_dir,
                coordinator_key=key,
                site_keys=site_keys,
                _visiting=visiting,
                _nested=nested,
            )
        return nested.reports[seen]

    report = verify_ledger(
        folder.ledger_path,
        coordinator_key=trusted,
        site_keys=membership.site_keys() if site_keys is None else site_keys,
        extra_checks=(
            membership_matches_ledger(membership, site_keys),
            checkpoints_match_ledger(folder),
            outputs_match_ledger(folder),
            receipts_match_ledger(receipt_files, trusted),
            lineage_matches_ledger(folder, trusted, verify_nested),
            lambda _entries: links_out_of(folder.root),
        ),
    )
    return dataclasses.replace(report, receipts=len(receipt_files))


def receipts_examined(report: VerifyReport) -> str:
    """How many site receipts the verification examined, said so that none is not read as
    "all hold": a deployed site keeps its receipts in its own storage, not in the run folder."""
    if not report.receipts:
        return "0 receipts examined (none in the run folder)"
    return f"{report.receipts} receipt{'s' if report.receipts != 1 else ''} examined"


def describe(report: VerifyReport) -> str:
    """One line saying whether the ledger verified."""
    if report.ok:
        return (
            f"ledger verified: {report.entries} entries, chain, coordinator signatures "
            f"({report.coordinator_fingerprint}), site signatures, checkpoints and metrics all "
            f"hold; {receipts_examined(report)}"
        )
    first = report.first_problem
    where = f"entry {first.seq}" if first and first.seq is not None else "run folder"
    reason = first.reason if first else "unknown problem"
    return (
        f"ledger FAILED verification: {len(report.problems)} problem(s); first at {where}: "
        f"{reason}; {receipts_examined(report)}"
    )


def read_site_keys(folder: Path) -> dict[str, PublicKey]:
    """The site keys an auditor pinned: every ``NAME.pub`` file of ``folder`` (as ``fedsilo keys
    init`` writes them), by site name NAME.

    Raises:
        ValueError: ``folder`` holds no ``.pub`` file (naming it), or one that is not a key
            (KeyFileError, naming the file).
    """
    paths = sorted(Path(folder).glob("*.pub"))
    if not paths:
        raise ValueError(f"{folder}: no site public key (NAME.pub) in this folder")
    return {path.stem: read_public_key(path) for path in paths}
