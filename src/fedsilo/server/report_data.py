"""The compliance report's content, read from a run folder and its ledger after verification.

Everything the report states comes from the ledger (what the coordinator signed: sites,
updates, rejections, aggregates, DP events, the policies the sites declared) or from named
files of the run folder (``status.json``, ``run.json``, ``metrics.jsonl``, and ``config.toml``
only where its digest is the one the ledger records); values the ledger does not cover are
marked so in the report. The ledger is read row by row and a row that cannot be read is skipped
here (verification reports it), so a tampered ledger still gets a report.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.config import ConfigError, FedsiloConfig, load_config
from fedsilo.evaluation.metrics import METRIC_SCORES, SECONDARY_LABELS
from fedsilo.ledger import Entry, EntryKind, LedgerError, VerifyReport
from fedsilo.ledger.entries import SITE_POLICY_FIELD
from fedsilo.ledger.store import parse_row, read_stored_ledger
from fedsilo.protocol.records import PolicyDeclaration, ProtocolError
from fedsilo.report import (
    DeclaredPolicy,
    Fact,
    Outcome,
    ReportData,
    RoundRow,
    SiteRow,
    UpdateRow,
    Verification,
    one_line,
)
from fedsilo.report.model import Execution, KeySource, RunStatus
from fedsilo.report.numbers import recorded_float
from fedsilo.server.audit import receipts_examined
from fedsilo.server.folder_checks import (
    UnsafeFileError,
    last_aggregated_round,
    read_metrics_lines,
    recorded_metric_digests,
    verified_metrics,
)
from fedsilo.server.membership import load_membership
from fedsilo.server.report_figures import (
    examples_note,
    float_pair,
    gold_parts_of,
    interval_caveats,
    interval_note,
    metric_note,
    round_examples,
)
from fedsilo.server.report_privacy import privacy_of
from fedsilo.server.report_provenance import (
    base_model_of,
    config_digests,
    execution_of,
    final_adapter_facts,
    precision_fact,
    recorded_config,
    strategy_fact,
)
from fedsilo.server.run_folder import RunFolder, record_digest

_NODE_LABEL = re.compile(r"^node-(\d+)(?: \((.+)\))?$")
_NOT_RECORDED = "not recorded"
# Runs from before run.json recorded the metric scored a task with these when the config named
# none; "files" then fell back to "code" (first word only), which is why it is named here.
LEGACY_DEFAULT_METRICS: Mapping[str, str] = {
    "icd10": "code",
    "files": "code",
    "drug-review": "sentiment",
    "shakespeare": "next-token",
}


def readable_entries(ledger_path: Path) -> list[Entry]:
    """Every entry of the ledger that can be parsed, in seq order; malformed rows are skipped.

    Raises LedgerError only when the file is missing or not a ledger at all.
    """
    entries: list[Entry] = []
    for row in read_stored_ledger(ledger_path).rows:
        try:
            entries.append(parse_row(row))
        except LedgerError:
            continue  # reported by verification as a problem at its seq
    return entries


def run_files(folder: RunFolder) -> tuple[FedsiloConfig | None, dict[str, Any]]:
    """The run's config.toml and run.json, each None or empty where it cannot be read (the
    reader then says what is not recorded)."""
    try:
        config: FedsiloConfig | None = load_config(folder.config_path)
    except (OSError, ConfigError, ValueError):
        config = None
    try:
        info = folder.read_json(folder.run_info_path)
    except (OSError, ValueError):
        info = {}
    return config, info


def _first(entries: Sequence[Entry], kind: EntryKind) -> Entry | None:
    return next((e for e in entries if e.kind is kind), None)


def _last(entries: Sequence[Entry], kind: EntryKind) -> Entry | None:
    return next((e for e in reversed(entries) if e.kind is kind), None)


def _text(value: object, default: str = _NOT_RECORDED) -> str:
    return default if value is None or value == "" else str(value)


def _verification(
    report: VerifyReport,
    key_source: KeySource,
    site_key_source: KeySource,
    replacements: dict[str, str],
) -> Verification:
    def line(seq: int | None, reason: str) -> str:
        where = f"entry {seq}" if seq is not None else "run folder"
        return f"{where}: {one_line(reason, replacements=replacements)}"

    problems = tuple(line(p.seq, p.reason) for p in report.problems)
    first = report.first_problem
    # Receipts live at the sites: "all hold" over none examined would overstate the check.
    receipts = "" if report.receipts is None else f"; {receipts_examined(report)}"
    if report.ok:
        summary = (
            f"{report.entries} entries: chain, coordinator signatures, site signatures, "
            f"checkpoints and metrics all hold{receipts}"
        )
    else:
        summary = f"{len(problems)} problem(s) in {report.entries} entries{receipts}"
    return Verification(
        ok=report.ok,
        summary=summary,
        problems=problems,
        first_broken=None if first is None else line(first.seq, first.reason),
        key_source=key_source,
        coordinator_fingerprint=report.coordinator_fingerprint,
        entries=report.entries,
        site_key_source=site_key_source,
        receipts=report.receipts,
    )


def _outcome(
    folder: RunFolder,
    entries: Sequence[Entry],
    planned: int | None,
    replacements: dict[str, str],
) -> Outcome:
    try:
        status_file = folder.read_json(folder.status_path)
    except (OSError, ValueError):
        status_file = {}
    raw = status_file.get("status")
    status: RunStatus = raw if raw in ("completed", "failed", "running") else "unknown"
    reason_text = status_file.get("reason")
    reason = one_line(str(reason_text), replacements=replacements) if reason_text else None
    failed_round = _last(entries, EntryKind.ROUND_FAILED)
    if (
        status in ("completed", "unknown")
        and failed_round is not None
        and _last(entries, EntryKind.RUN_FINISHED) is None
    ):
        status = "failed"
        reason = (
            f"round {failed_round.payload.get('round')} failed (ledger entry {failed_round.seq})"
        )
    if status == "completed" and _last(entries, EntryKind.RUN_FINISHED) is None:
        # status.json is not signed; the ledger has the last word on whether the run finished.
        status = "unknown"
        reason = "status.json says completed, but the ledger has no run_finished entry"
    done = {e.payload.get("round") for e in entries if e.kind is EntryKind.ROUND_AGGREGATED}
    return Outcome(status=status, reason=reason, rounds_done=len(done), rounds_planned=planned)


def _node_sites(entries: Sequence[Entry]) -> dict[int, str]:
    """Flower node -> the site that signed updates from it, per the ledger."""
    sites: dict[int, str] = {}
    for entry in entries:
        node = entry.payload.get("node")
        site = entry.payload.get("site_id")
        if entry.kind is EntryKind.UPDATE_RECEIVED and isinstance(node, int):
            sites[node] = str(site)
    return sites


def _update_rows(entries: Sequence[Entry], replacements: dict[str, str]) -> tuple[UpdateRow, ...]:
    node_sites = _node_sites(entries)
    rows: list[UpdateRow] = []
    for entry in entries:
        payload = entry.payload
        round_number = payload.get("round")
        if not isinstance(round_number, int):
            continue
        if entry.kind is EntryKind.UPDATE_RECEIVED:
            size = payload.get("payload_bytes")
            rows.append(
                UpdateRow(
                    round=round_number,
                    site=str(payload.get("site_id")),
                    accepted=True,
                    detail=f"sha256 {payload.get('payload_sha256')}",
                    size_bytes=size if isinstance(size, int) and size >= 0 else None,
                )
            )
        elif entry.kind is EntryKind.UPDATE_REJECTED:
            sender = str(payload.get("sender"))
            site, node = sender, None
            label = _NODE_LABEL.match(sender)
            if label is not None:
                known = node_sites.get(int(label.group(1)))
                if known is not None:
                    site, node = known, f"node-{label.group(1)}"
            rows.append(
                UpdateRow(
                    round=round_number,
                    site=site,
                    accepted=False,
                    detail=one_line(str(payload.get("reason")), replacements=replacements),
                    size_bytes=None,
                    node=node,
                )
            )
    return tuple(rows)


def declared_policies(
    entries: Sequence[Entry],
) -> dict[str, tuple[tuple[DeclaredPolicy, ...], int]]:
    """Per site, the policies its accepted updates declared (in order of first use, with the
    rounds of each) and how many of its updates declared none readable."""
    rounds: dict[str, dict[tuple[str | None, int], list[int]]] = defaultdict(dict)
    undeclared: dict[str, int] = defaultdict(int)
    for entry in entries:
        round_number = entry.payload.get("round")
        if entry.kind is not EntryKind.UPDATE_RECEIVED or not isinstance(round_number, int):
            continue
        site = str(entry.payload.get("site_id"))
        raw = entry.payload.get(SITE_POLICY_FIELD)
        try:
            if not isinstance(raw, dict):
                raise ProtocolError("no declaration")
            # Its signature is checked by verification; the report shows what was declared.
            values = {name: value for name, value in raw.items() if name != "signature"}
            declared = PolicyDeclaration.from_fields(values)
        except ProtocolError:
            undeclared[site] += 1
            continue
        key = (declared.policy_sha256, declared.min_cohort)
        rounds[site].setdefault(key, []).append(round_number)
    return {
        site: (
            tuple(
                DeclaredPolicy(digest, min_cohort, tuple(sorted(set(seen))))
                for (digest, min_cohort), seen in rounds.get(site, {}).items()
            ),
            undeclared.get(site, 0),
        )
        for site in sorted(set(rounds) | set(undeclared))
    }


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _round_rows(folder: RunFolder, entries: Sequence[Entry]) -> tuple[RoundRow, ...]:
    """One row per well-formed record of metrics.jsonl (verification names any other line),
    marked ledgered only where the record is the one whose digest the ledger records."""
    aggregated = {
        e.payload.get("round"): e for e in entries if e.kind is EntryKind.ROUND_AGGREGATED
    }
    started = _first(entries, EntryKind.RUN_STARTED)
    # Sums of placeholder counts (record-level DP) or of nothing (secure aggregation) are not
    # example counts: only what every summed site sent is shown.
    examples_by_round = round_examples(entries)
    ledgered = recorded_metric_digests(entries)
    rows: list[RoundRow] = []
    try:
        lines = read_metrics_lines(folder)
    except UnsafeFileError:
        lines = []
    for line in lines:
        round_number, record = line.round, line.record
        if round_number is None or record is None:
            continue
        entry = aggregated.get(round_number)
        examples, withheld = examples_by_round.get(round_number, (None, None))
        if entry is not None:
            digest: str | None = str(entry.payload.get("adapter_sha256"))
            sites = entry.payload.get("sites")
            summed = tuple(str(s) for s in sites) if isinstance(sites, list) else ()
        elif round_number == 0 and started is not None:
            digest, summed = str(started.payload.get("initial_adapter_sha256")), ()
        else:
            digest, summed = None, ()
        recorded = ledgered.get(round_number, (None, None))[1]
        rows.append(
            RoundRow(
                round=round_number,
                sites_ok=_count(record.get("sites_ok")),
                sites_failed=_count(record.get("sites_failed")),
                summed_sites=summed,
                examples=examples,
                examples_withheld=withheld,
                # None where the round has none (no training at round 0, no gold scoring
                # between ``every_rounds``) or it is not a finite number.
                train_loss=recorded_float(record.get("train_loss")),
                gold_accuracy=recorded_float(record.get("gold_accuracy")),
                gold_category_accuracy=recorded_float(record.get("gold_category_accuracy")),
                gold_loss=recorded_float(record.get("gold_loss")),
                gold_count=_count(record.get("gold_count")),
                adapter_sha256=digest,
                category_ci95=float_pair(record.get("gold_category_accuracy_ci95")),
                metrics_ledgered=recorded is not None and record_digest(record) == recorded,
            )
        )
    return tuple(rows)


def last_verified_record(
    folder: RunFolder, entries: Sequence[Entry], round_number: int | None = None
) -> dict[str, Any]:
    """The metrics.jsonl record of ``round_number`` (default: the last round the ledger
    records) that hashes to the digest the ledger records for it; empty where there is none,
    so that no figure the ledger does not vouch for is stated as the run's result."""
    wanted = last_aggregated_round(entries) if round_number is None else round_number
    if wanted is None:
        return {}
    return verified_metrics(folder, entries).get(wanted, {})


def metric_name(config: FedsiloConfig | None, info: Mapping[str, Any]) -> str:
    """The metric the run's accuracies were scored with, as recorded or by the task's default."""
    recorded = info.get("metric")
    if isinstance(recorded, str):
        return recorded
    if config is None:
        return "unknown"
    return config.task.metric or LEGACY_DEFAULT_METRICS.get(config.task.name, "unknown")


def metric_meaning(metric: str) -> str:
    """What the accuracy and the secondary score measure under ``metric``, in one line."""
    if metric not in METRIC_SCORES:
        return "an unknown metric"
    accuracy, secondary = METRIC_SCORES[metric]
    return f"accuracy: {accuracy}; {SECONDARY_LABELS[metric]}: {secondary}"


_EXECUTED = {
    "simulation": ", simulated on one machine, not a deployment",
    "deployment": ", deployed across machines",
    "central": "",
    "unknown": ", not recorded whether simulated or deployed",
}


def _kind(started: Entry | None, execution: Execution) -> str:
    kind = started.payload.get("kind") if started else None
    name = {
        "clustered": "clustered run (one expert per cluster)",
        "distillation": "distillation",
    }.get(str(kind), "federated run")
    return f"{name}{_EXECUTED[execution.kind]}"


def _trained_in(entries: Sequence[Entry]) -> tuple[str, ...]:
    """The runs that trained on site records for a run whose own ledger records none: each
    expert of a clustered run, the experts a distillation started from."""
    runs: list[str] = []
    for entry in entries:
        payload = entry.payload
        if entry.kind is EntryKind.EXPERT_FINISHED:
            runs.append(
                f"expert {payload.get('cluster')}: run {payload.get('run_id')} in "
                f"clusters/{payload.get('cluster')} (its report: fedsilo audit report "
                f"RUN/clusters/{payload.get('cluster')})"
            )
        elif entry.kind is EntryKind.DISTILL_SOURCES:
            experts = payload.get("experts")
            where = payload.get("experts_dir")
            for name, source in sorted(experts.items() if isinstance(experts, dict) else ()):
                sites = source.get("sites") if isinstance(source, dict) else None
                runs.append(f"expert {name} (sites {sites}), from the experts in {where}")
    return tuple(runs)


def _notes(entries: Sequence[Entry]) -> tuple[str, ...]:
    notes: list[str] = []
    for entry in entries:
        payload = entry.payload
        if entry.kind is EntryKind.CLUSTERS_ASSIGNED:
            clusters = payload.get("clusters")
            if isinstance(clusters, dict):
                for name, sites in sorted(clusters.items()):
                    notes.append(f"cluster {name} ({payload.get('method')}): sites {sites}")
        elif entry.kind is EntryKind.EXPERT_FINISHED:
            notes.append(
                f"expert {payload.get('cluster')}: cluster run {payload.get('run_id')}, "
                f"ledger head {payload.get('ledger_head_hash')}, adapter "
                f"{payload.get('adapter_sha256')}; its own report: fedsilo audit report "
                f"RUN/clusters/{payload.get('cluster')}"
            )
        elif entry.kind is EntryKind.DISTILL_SOURCES:
            experts = payload.get("experts")
            if isinstance(experts, dict):
                for name, source in sorted(experts.items()):
                    if isinstance(source, dict):
                        notes.append(
                            f"distilled from expert {name}: adapter "
                            f"{source.get('adapter_sha256')}, sites {source.get('sites')}"
                        )
            transfer = payload.get("transfer")
            if isinstance(transfer, dict):
                notes.append(f"transfer set sha256 {transfer.get('sha256')}")
        elif entry.kind is EntryKind.SECURE_AGGREGATION_STAGE:
            notes += _secure_stage_notes(payload)
    return tuple(notes)


def _secure_stage_notes(payload: Mapping[str, Any]) -> list[str]:
    """What an auditor should see of a secure-aggregation stage: shares left out of the
    unmasking, and an attempt that halted (and why)."""
    where = f"round {payload.get('round')} attempt {payload.get('attempt')}"
    notes = []
    off = payload.get("off_polynomial")
    if isinstance(off, dict):
        for owner, holders in sorted(off.items()):
            held = ", ".join(str(h) for h in holders) if isinstance(holders, list) else holders
            notes.append(
                f"{where}: the unmasking left out the shares of {owner}'s secret held by {held}: "
                f"off the polynomial its commitment fits (sent wrong by the holder, or dealt "
                f"wrong by {owner}); the sum did not use them"
            )
    if payload.get("outcome") == "halted":
        notes.append(
            f"{where}: secure aggregation halted at {payload.get('stage')}: "
            f"{_text(payload.get('reason'))}"
        )
    return notes


def _facts(
    folder: RunFolder,
    entries: Sequence[Entry],
    info: Mapping[str, Any],
    config: FedsiloConfig | None,
    metric: str,
    execution: Execution,
) -> tuple[Fact, ...]:
    started = _first(entries, EntryKind.RUN_STARTED)
    finished = _last(entries, EntryKind.RUN_FINISHED)
    start = started.payload if started else {}
    try:
        membership = load_membership(folder.membership_path)
        run_id, federation = membership.run_id, membership.federation_id
    except (OSError, ValueError, KeyError):
        run_id, federation = _text(start.get("run_id")), _text(start.get("federation_id"))
    base = base_model_of(info, start, config)
    resumed_after = finished is not None and any(
        e.kind is EntryKind.RUN_RESUMED and e.seq > finished.seq for e in entries
    )
    if finished is not None and not resumed_after:
        ended: str | None = finished.created_at
    elif finished is not None:
        ended = (
            f"not finished: finished at {finished.created_at}, then resumed for more rounds "
            f"(last ledger entry {entries[-1].created_at})"
        )
    else:
        ended = f"not finished (last ledger entry {entries[-1].created_at})" if entries else None
    digests = [str(digest) for digest in config_digests(entries) if digest]
    # A resumed run may run under another configuration (more rounds): the last one is the
    # one it ran under, and config.toml is read only if it is that one.
    digest_note = (
        f"the last run start or resume; the run started under {digests[0]}"
        if digests and digests[-1] != digests[0]
        else None
    )
    facts = [
        Fact("Run id", run_id, True),
        Fact("Federation id", federation, True),
        Fact("Started", _text(started.created_at if started else None)),
        Fact("Ended", _text(ended)),
        Fact("Task", _text(config.task.name if config else None)),
        Fact("Base model", _text(base.sentence() if base else None)),
        Fact(
            "Base model hash",
            _text(start.get("base_model_hash") or info.get("base_model_hash")),
            True,
        ),
        strategy_fact(entries, config),
        precision_fact(info, entries, simulated=execution.kind == "simulation"),
        Fact("Metric", metric),
        Fact(
            "Configuration digest",
            _text(digests[-1] if digests else info.get("config_digest")),
            True,
            digest_note,
        ),
        Fact("fedsilo version", _text(info.get("fedsilo_version") or start.get("fedsilo_version"))),
        Fact("flwr version", _text(info.get("flwr_version"))),
        Fact("torch version", _text(info.get("torch_version"))),
        Fact("Ledger head hash", _text(entries[-1].entry_hash if entries else None), True),
        *final_adapter_facts(finished),
    ]
    return tuple(facts)


def build_report_data(
    run_dir: Path,
    report: VerifyReport,
    *,
    key_source: KeySource,
    site_key_source: KeySource = "folder",
) -> ReportData:
    """Everything the compliance report shows, from the run folder and its ledger.

    ``report`` is the verification of the same folder; ``key_source`` says whether its
    coordinator key was pinned by the auditor or taken from the folder, ``site_key_source``
    the same of the site keys. Raises LedgerError only when the ledger cannot be read at all.
    """
    folder = RunFolder(run_dir)
    replacements = {str(folder.root.resolve()): "RUN", str(folder.root): "RUN"}
    entries = readable_entries(folder.ledger_path)
    raw_config, info = run_files(folder)
    # Only a config.toml whose digest the ledger records speaks for the run; the rest of the
    # report reads the run's settings from it or says they are not established.
    config = recorded_config(raw_config, entries)
    started = _first(entries, EntryKind.RUN_STARTED)
    updates = _update_rows(entries, replacements)
    privacy = privacy_of(entries, config)
    try:
        fingerprints = dict(load_membership(folder.membership_path).fingerprints())
    except (OSError, ValueError, KeyError):
        sites_field = started.payload.get("sites") if started else None
        fingerprints = (
            {str(k): str(v) for k, v in sites_field.items()}
            if isinstance(sites_field, dict)
            else {}
        )
    policies = declared_policies(entries)
    sites = []
    for name, key_fingerprint in sorted(fingerprints.items()):
        declared, undeclared = policies.get(name, ((), 0))
        sites.append(
            SiteRow(
                name=name,
                fingerprint=key_fingerprint,
                accepted=sum(1 for u in updates if u.site == name and u.accepted),
                rejected=sum(1 for u in updates if u.site == name and not u.accepted),
                policies=declared,
                undeclared=undeclared,
            )
        )
    rounds = _round_rows(folder, entries)
    parts = gold_parts_of(last_verified_record(folder, entries))
    metric = metric_name(config, info)
    secondary = SECONDARY_LABELS.get(metric, "secondary score")
    execution = execution_of(
        folder,
        raw_config,
        entries,
        sorted(fingerprints),
        private=bool(privacy.epsilon or privacy.site_level_epsilon),
    )
    run_name = info.get("run_name") or (started.payload.get("run_name") if started else None)
    counts = [r.gold_count for r in rounds if r.gold_count is not None and r.metrics_ledgered]
    return ReportData(
        run_name=_text(run_name, folder.root.name),
        run_kind=_kind(started, execution),
        generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        verification=_verification(report, key_source, site_key_source, replacements),
        outcome=_outcome(folder, entries, config.run.rounds if config else None, replacements),
        facts=_facts(folder, entries, info, config, metric, execution),
        privacy=privacy,
        sites=tuple(sites),
        rounds=rounds,
        updates=updates,
        metric=metric,
        secondary=secondary,
        metric_note=metric_note(
            metric_meaning(metric),
            gold_count=counts[-1] if counts else None,
            all_ledgered=all(r.metrics_ledgered for r in rounds),
        ),
        gold_parts=parts,
        notes=_notes(entries),
        trained_in=_trained_in(entries),
        execution=execution,
        examples_note=examples_note(rounds, entries),
        interval_note=(
            interval_note(metric)
            if any(r.category_ci95 for r in rounds) or any(p.ci95 for p in parts)
            else None
        ),
        interval_caveats=interval_caveats(rounds, parts, metric=metric, secondary=secondary),
    )
