"""Auditing provenance: clustered runs and distilled adapters against the files they name.

A clustered run's index ledger names, per cluster, a complete run folder and an expert adapter;
a distillation's ledger names its experts, its transfer set and the master adapter. These
checks (extra checks of ``fedsilo audit verify``) hold each name to the bytes on disk:

- ``clusters_assigned``: the clusters are the ones the config's groups give, or, for
  "update-cosine", the ones the recorded similarities give (recomputed), and the similarities
  are those of the probe updates on disk (recomputed from RUN/probe);
- ``expert_finished``: the cluster's run verifies on its own under the same coordinator key,
  its ledger still ends at the recorded head (nothing added or cut since), its final adapter
  is the recorded one, and the expert folder holds exactly that adapter; no cluster run or
  expert folder exists that the ledger does not name;
- ``distill_sources``: every expert adapter and the transfer set hash as recorded; when the
  experts came from a clustered run, that run verifies and its ledger holds the recorded head
  (under the auditor's key when the same coordinator signed both, else under the key pinned
  in that run's federation.json);
- ``run_finished`` of a distillation: final/ holds the recorded master adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedsilo.config import load_config
from fedsilo.crypto import PublicKey, public_key_text
from fedsilo.ledger import Entry, EntryKind, ExtraCheck, VerifyProblem, VerifyReport, read_entries
from fedsilo.model.adapters import adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.server.clustering import agglomerate, cosine_similarities
from fedsilo.server.federation import adapter_digest
from fedsilo.server.folder_checks import UnsafeFileError, contained, hash_file, read_bounded
from fedsilo.server.membership import load_membership
from fedsilo.server.run_folder import RunFolder

PEFT_WEIGHTS = "adapter_model.safetensors"
EXPERT_INFO = "expert.json"
# Recomputed cosines may differ from the recorded ones in the last bits on other hardware.
COSINE_TOLERANCE = 1e-9
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

RunVerifier = Callable[[Path, PublicKey], VerifyReport]
"""Verifies a whole run folder under a given coordinator key (fedsilo.server.audit.verify_run)."""


def _file_problem(seq: int, what: str, path: Path, recorded: object) -> list[VerifyProblem]:
    if not path.exists():
        return [VerifyProblem(seq, f"{what}: {path} is missing; the ledger records {recorded}")]
    try:
        actual = hash_file(path)
    except UnsafeFileError as error:
        return [VerifyProblem(seq, f"{what}: {error}")]
    if actual != recorded:
        return [
            VerifyProblem(
                seq, f"{what}: the ledger records {recorded}, but {path} hashes to {actual}"
            )
        ]
    return []


def _nested(seq: int, label: str, report: VerifyReport) -> list[VerifyProblem]:
    return [
        VerifyProblem(
            seq, f"{label}: {'entry ' + str(p.seq) if p.seq is not None else 'folder'}: {p.reason}"
        )
        for p in report.problems
    ]


def _head_problems(
    seq: int, label: str, ledger: Path, payload: Mapping[str, object]
) -> list[VerifyProblem]:
    try:
        entries = read_entries(ledger)
    except (OSError, ValueError, RuntimeError) as error:
        return [VerifyProblem(seq, f"{label}: cannot read {ledger}: {error}")]
    head = str(payload.get("ledger_head_hash"))
    count = payload.get("ledger_entries")
    if not entries or entries[-1].entry_hash != head or len(entries) != count:
        return [
            VerifyProblem(
                seq,
                f"{label}: {ledger} should end at entry {count} with hash {head}, but it has "
                f"{len(entries)} entries ending with {entries[-1].entry_hash if entries else '-'}",
            )
        ]
    return []


def _cluster_problems(folder: RunFolder, entry: Entry) -> list[VerifyProblem]:
    payload = entry.payload
    clusters = payload.get("clusters")
    if not isinstance(clusters, dict):
        return [VerifyProblem(entry.seq, "clusters_assigned has no clusters map")]
    assigned = {
        name: sorted(map(str, sites)) for name, sites in clusters.items() if isinstance(sites, list)
    }
    method = payload.get("method")
    config = load_config(folder.config_path).clusters
    if method != config.method:
        return [
            VerifyProblem(
                entry.seq, f"method {method!r}, but {folder.config_path} says {config.method!r}"
            )
        ]
    if method == "groups":
        expected = {name: sorted(sites) for name, sites in config.groups.items()}
        if assigned != expected:
            return [
                VerifyProblem(
                    entry.seq, f"clusters {assigned} are not the config's groups {expected}"
                )
            ]
        return []
    if method != "update-cosine":
        return []
    similarity = payload.get("similarity")
    digests = payload.get("probe_sha256")
    if not isinstance(similarity, dict) or not isinstance(digests, dict):
        return [
            VerifyProblem(entry.seq, "update-cosine clusters without similarities or probe digests")
        ]
    matrix: dict[str, dict[str, float]] = {}
    for a, row in similarity.items():
        if not isinstance(row, dict):
            return [VerifyProblem(entry.seq, f"similarity row {a!r} is not a map")]
        matrix[a] = {b: float(v) for b, v in row.items() if isinstance(v, int | float)}
    problems: list[VerifyProblem] = []
    regrouped = sorted(agglomerate(matrix, count=len(assigned)))
    if regrouped != sorted(assigned.values()):
        problems.append(
            VerifyProblem(entry.seq, f"the similarities give clusters {regrouped}, not {assigned}")
        )
    probes = {}
    for site, digest in sorted(digests.items()):
        try:
            path = contained(folder.root, f"probe/{site}.safetensors", field="probe_sha256")
            found = _file_problem(entry.seq, f"probe update of {site}", path, digest)
            if not found:
                probes[site] = adapter_from_bytes(read_bounded(path))
        except (UnsafeFileError, ModelError) as error:
            found = [VerifyProblem(entry.seq, f"probe update of {site}: {error}")]
        problems += found
    if problems:
        return problems
    recomputed = cosine_similarities(probes)
    for a, columns in recomputed.items():
        for b, value in columns.items():
            if not math.isclose(
                value, matrix.get(a, {}).get(b, math.nan), abs_tol=COSINE_TOLERANCE
            ):
                problems.append(
                    VerifyProblem(entry.seq, f"similarity {a}/{b} recomputes to {value}")
                )
    return problems


def _expert_problems(
    folder: RunFolder, entry: Entry, trusted: PublicKey, verify: RunVerifier
) -> list[VerifyProblem]:
    payload = entry.payload
    name = str(payload.get("cluster"))
    try:
        run_dir = contained(folder.root, payload.get("run_folder"), field="run_folder")
        expert_dir = contained(folder.root, payload.get("expert_folder"), field="expert_folder")
    except UnsafeFileError as error:
        return [VerifyProblem(entry.seq, f"cluster {name}: {error}")]
    label = f"cluster {name} ({run_dir})"
    if not RunFolder(run_dir).ledger_path.exists():
        return [VerifyProblem(entry.seq, f"{label}: its run folder or ledger is missing")]
    problems = _nested(entry.seq, label, verify(run_dir, trusted))
    problems += _head_problems(entry.seq, label, RunFolder(run_dir).ledger_path, payload)
    finished = [
        e for e in read_entries(RunFolder(run_dir).ledger_path) if e.kind is EntryKind.RUN_FINISHED
    ]
    if not finished or finished[-1].payload.get("final_adapter_sha256") != payload.get(
        "adapter_sha256"
    ):
        problems.append(
            VerifyProblem(
                entry.seq, f"{label}: its ledger does not finish with the recorded adapter"
            )
        )
    problems += _file_problem(
        entry.seq, f"expert {name}", expert_dir / PEFT_WEIGHTS, payload.get("peft_sha256")
    )
    problems += _file_problem(
        entry.seq, f"expert {name}", expert_dir / EXPERT_INFO, payload.get("expert_info_sha256")
    )
    if not problems:
        try:
            tensors = adapter_from_bytes(read_bounded(expert_dir / PEFT_WEIGHTS))
        except (ModelError, UnsafeFileError) as error:
            return [VerifyProblem(entry.seq, f"expert {name}: {error}")]
        if adapter_digest(tensors) != payload.get("adapter_sha256"):
            problems.append(
                VerifyProblem(entry.seq, f"expert {name}: tensors are not the recorded adapter")
            )
    return problems


def _unrecorded_folders(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    named = {
        str(e.payload.get(key))
        for e in entries
        if e.kind is EntryKind.EXPERT_FINISHED
        for key in ("run_folder", "expert_folder")
    }
    problems = []
    for parent in ("clusters", "experts"):
        base = folder.root / parent
        if not base.is_dir():
            continue
        for sub in sorted(base.iterdir()):
            if f"{parent}/{sub.name}" not in named:
                problems.append(VerifyProblem(None, f"{sub} is not recorded in the ledger"))
    return problems


def _external_folder(value: object) -> Path | None:
    """An absolute folder named by a verified distill_sources entry, or None."""
    if not isinstance(value, str) or not Path(value).is_absolute() or not Path(value).is_dir():
        return None
    return Path(value)


def _sources_problems(
    folder: RunFolder, entry: Entry, trusted: PublicKey, verify: RunVerifier
) -> list[VerifyProblem]:
    payload = entry.payload
    problems: list[VerifyProblem] = []
    transfer = payload.get("transfer")
    if isinstance(transfer, dict):
        try:
            path = contained(folder.root, transfer.get("file"), field="transfer.file")
        except UnsafeFileError as error:
            problems.append(VerifyProblem(entry.seq, f"transfer set: {error}"))
        else:
            problems += _file_problem(entry.seq, "transfer set", path, transfer.get("sha256"))
    # The experts and their clustered run live outside the distillation's folder, so the
    # ledger names them by absolute path: followed only because the entry's signature
    # verified, only to folders, only by safe names, and every file read has a size limit.
    experts_dir = _external_folder(payload.get("experts_dir"))
    experts = payload.get("experts")
    for name, recorded in sorted(experts.items()) if isinstance(experts, dict) else []:
        digest = recorded.get("peft_sha256") if isinstance(recorded, dict) else None
        if experts_dir is None or not SAFE_NAME.fullmatch(name):
            problems.append(
                VerifyProblem(
                    entry.seq,
                    f"expert {name!r} in {payload.get('experts_dir')!r} "
                    "is not a safe name in a folder; not read",
                )
            )
            continue
        problems += _file_problem(
            entry.seq, f"expert {name}", experts_dir / name / PEFT_WEIGHTS, digest
        )
    source = payload.get("source_run")
    if isinstance(source, dict):
        run_dir = _external_folder(source.get("folder"))
        if run_dir is None:
            return [
                *problems,
                VerifyProblem(entry.seq, f"source run {source.get('folder')!r} is not a folder"),
            ]
        label = f"source run {run_dir}"
        if not RunFolder(run_dir).membership_path.exists():
            return [*problems, VerifyProblem(entry.seq, f"{label}: the run folder is missing")]
        # Distilled by the run's own coordinator (the default): the auditor's key covers both.
        # Signed by another party: that run's own pinned key, which shows consistency only.
        pinned = load_membership(RunFolder(run_dir).membership_path).coordinator_key()
        key = trusted if public_key_text(pinned) == public_key_text(trusted) else pinned
        problems += _nested(entry.seq, label, verify(run_dir, key))
        problems += _head_problems(entry.seq, label, RunFolder(run_dir).ledger_path, source)
    return problems


def lineage_matches_ledger(
    folder: RunFolder, trusted: PublicKey, verify: RunVerifier
) -> ExtraCheck:
    """An extra ledger check for the provenance entries (the module docstring lists them)."""

    def entry_problems(entry: Entry) -> list[VerifyProblem]:
        if entry.kind is EntryKind.CLUSTERS_ASSIGNED:
            return _cluster_problems(folder, entry)
        if entry.kind is EntryKind.EXPERT_FINISHED:
            return _expert_problems(folder, entry, trusted, verify)
        if entry.kind is EntryKind.DISTILL_SOURCES:
            return _sources_problems(folder, entry, trusted, verify)
        if entry.kind is EntryKind.RUN_FINISHED and "final_peft_sha256" in entry.payload:
            return _file_problem(
                entry.seq,
                "master adapter",
                folder.final_dir / PEFT_WEIGHTS,
                entry.payload["final_peft_sha256"],
            )
        return []

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        problems: list[VerifyProblem] = []
        for entry in entries:
            try:
                problems += entry_problems(entry)
            except Exception as error:
                # The folders, ledgers and configs an entry names were written by whoever
                # handed the run over: whatever reading them raises (a number too large for
                # a float, a null path, an unreadable nested ledger) fails that entry, never
                # the audit.
                problems.append(
                    VerifyProblem(entry.seq, f"{entry.kind}: {type(error).__name__}: {error}")
                )
        clustered = any(entry.kind is EntryKind.CLUSTERS_ASSIGNED for entry in entries)
        if clustered or (folder.root / "clusters").exists():
            try:
                problems += _unrecorded_folders(folder, entries)
            except OSError as error:
                problems.append(VerifyProblem(None, f"clusters folder: {error}"))
        return problems

    return check
