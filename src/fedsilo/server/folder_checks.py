"""What a run folder hands out, held to its verified ledger: final/, status and metrics.

Extra checks of ``fedsilo audit verify`` (they see only entries whose chain and signatures
verified, see :mod:`fedsilo.ledger.verify`):

- ``final/``: its files are exactly the ones the ``run_finished`` entry records (file sha256 of
  ``adapter_model.safetensors`` and ``adapter_config.json``; ledgers written before these were
  recorded bind the weights through their tensors' digest), and the final adapter is the last
  aggregate the ledger records;
- ``status.json`` saying "completed": the ledger ends with ``run_finished`` (a ledger cut at
  its end, with final/ and the last round's files removed, no longer passes);
- metrics: every round record in ``metrics.jsonl`` and in ``checkpoints/round-N/round.json``
  hashes to the ``metrics_sha256`` the ledger recorded for that round (the baseline of round 0
  in ``baseline_evaluated``). A round whose entry has no digest (ledgers written before it was
  recorded) is marked unverified in the compliance report, not passed off as verified.

Files are read only when they are regular files inside the run folder and below a size limit.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.ledger import Entry, EntryKind, ExtraCheck, VerifyProblem
from fedsilo.model.adapters import adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.server.rounds import adapter_digest
from fedsilo.server.run_folder import RunFolder, record_digest

MAX_HASHED_BYTES = 16 * 1024**3
"""Largest file the audit hashes (streamed): far above any adapter, far below a disk-filler."""
MAX_PARSED_BYTES = 2 * 1024**3
"""Largest file the audit loads into memory to parse (adapter weights, JSON)."""
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class UnsafeFileError(ValueError):
    """A file the audit will not read: outside the run folder, not a regular file, too large."""


def contained(root: Path, relative: object, *, field: str) -> Path:
    """``root / relative`` when ``relative`` is a relative path that stays inside ``root``.

    Raises UnsafeFileError naming ``field`` for absolute paths, ``..`` escapes (symlinks
    included, as the path is resolved) and non-string values.
    """
    if not isinstance(relative, str) or not relative:
        raise UnsafeFileError(f"{field} is {relative!r}, not a path inside the run folder")
    candidate = Path(relative)
    if candidate.is_absolute():
        raise UnsafeFileError(
            f"{field} is the absolute path {relative!r}; only paths inside the run folder are read"
        )
    base = Path(root).resolve()
    resolved = (base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafeFileError(f"{field} {relative!r} leaves the run folder {root}")
    return Path(root) / candidate


def _regular_size(path: Path, limit: int) -> int:
    try:
        info = path.stat()
    except OSError as error:
        raise UnsafeFileError(f"{path}: cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise UnsafeFileError(f"{path}: {info.st_size} bytes, over the audit's {limit}-byte limit")
    return info.st_size


def hash_file(path: Path, *, limit: int = MAX_HASHED_BYTES) -> str:
    """sha256 hex of a regular file of at most ``limit`` bytes, read in chunks."""
    _regular_size(path, limit)
    digest = hashlib.sha256()
    read = 0
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            read += len(chunk)
            if read > limit:  # the file grew while it was read
                raise UnsafeFileError(f"{path}: over the audit's {limit}-byte limit")
            digest.update(chunk)
    return digest.hexdigest()


def read_bounded(path: Path, *, limit: int = MAX_PARSED_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    _regular_size(path, limit)
    with Path(path).open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{path}: over the audit's {limit}-byte limit")
    return data


def _last(entries: Sequence[Entry], kind: EntryKind) -> Entry | None:
    found = [entry for entry in entries if entry.kind is kind]
    return found[-1] if found else None


def _final_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    finished = _last(entries, EntryKind.RUN_FINISHED)
    if finished is None or not folder.final_dir.exists():
        return []  # a final/ without run_finished is reported by checkpoints_match_ledger
    problems: list[VerifyProblem] = []
    payload = finished.payload
    # The aggregate the run finished with; a resumed run may have aggregated more since.
    aggregated = _last([e for e in entries if e.seq < finished.seq], EntryKind.ROUND_AGGREGATED)
    final_digest = payload.get("final_adapter_sha256")
    if aggregated is not None and aggregated.payload.get("adapter_sha256") != final_digest:
        problems.append(
            VerifyProblem(
                finished.seq,
                f"run_finished records final adapter {final_digest}, not the last aggregate "
                f"{aggregated.payload.get('adapter_sha256')} (entry {aggregated.seq})",
            )
        )
    recorded = payload.get("final_files")
    try:
        if isinstance(recorded, dict):
            problems += _final_files_problems(folder, finished.seq, recorded)
        elif "final_peft_sha256" not in payload:  # a distillation's is checked by lineage
            problems += final_tensor_problems(folder, finished.seq, final_digest)
    except UnsafeFileError as error:
        problems.append(VerifyProblem(finished.seq, f"final adapter: {error}"))
    return problems


def _final_files_problems(
    folder: RunFolder, seq: int, recorded: Mapping[str, object]
) -> list[VerifyProblem]:
    problems: list[VerifyProblem] = []
    present = sorted(item.name for item in folder.final_dir.iterdir())
    for name in present:
        if name not in recorded:
            problems.append(
                VerifyProblem(seq, f"{folder.final_dir / name} is not recorded in the ledger")
            )
    for name, digest in sorted(recorded.items()):
        path = folder.final_dir / name
        if name not in present:
            problems.append(VerifyProblem(seq, f"{path} is missing; the ledger records {digest}"))
            continue
        actual = hash_file(contained(folder.root, f"final/{name}", field="final_files"))
        if actual != digest:
            problems.append(
                VerifyProblem(
                    seq,
                    f"{path} hashes to {actual}, but the ledger records {digest}: it is not "
                    "the adapter the federation produced",
                )
            )
    return problems


def final_tensor_problems(folder: RunFolder, seq: int, digest: object) -> list[VerifyProblem]:
    # Ledgers from before final_files was recorded: the weights' tensors still have to be the
    # final adapter (FFA-LoRA's frozen A is not in the adapter state, so compare its keys only).
    path = folder.final_dir / PEFT_FILES[1]
    try:
        tensors = adapter_from_bytes(read_bounded(path))
    except ModelError as error:
        return [VerifyProblem(seq, f"{path}: {error}")]
    last = folder.latest_checkpoint_round()
    if last is not None:
        names = set(folder.load_checkpoint(last).adapter)
        tensors = {name: tensor for name, tensor in tensors.items() if name in names}
    if adapter_digest(tensors) != digest:
        return [
            VerifyProblem(seq, f"{path} does not hold the final adapter {digest} of the ledger")
        ]
    return []


def _status_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    try:
        status = folder.read_json(folder.status_path).get("status")
    except (OSError, ValueError):
        return []  # no status file: nothing claimed
    if status != "completed" or (entries and entries[-1].kind is EntryKind.RUN_FINISHED):
        return []
    last = f"{entries[-1].kind} (entry {entries[-1].seq})" if entries else "nothing"
    return [
        VerifyProblem(
            None,
            f"{folder.status_path} says the run completed, but the verified ledger ends with "
            f"{last}, not run_finished: entries may have been cut from its end",
        )
    ]


def recorded_metric_digests(entries: Sequence[Entry]) -> dict[int, tuple[int, str | None]]:
    """Round -> (seq, metrics sha256 or None) of the entry that last recorded the round."""
    recorded: dict[int, tuple[int, str | None]] = {}
    for entry in entries:
        if entry.kind in (EntryKind.ROUND_AGGREGATED, EntryKind.BASELINE_EVALUATED):
            round_number = entry.payload.get("round")
            digest = entry.payload.get("metrics_sha256")
            if isinstance(round_number, int):
                recorded[round_number] = (entry.seq, digest if isinstance(digest, str) else None)
    return recorded


def _metric_records(folder: RunFolder) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of every metrics record in the folder; raises UnsafeFileError."""
    found: list[tuple[str, dict[str, Any]]] = []
    if folder.metrics_path.exists():
        text = read_bounded(folder.metrics_path).decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                found.append((f"{folder.metrics_path} line {number}", _json_object(line)))
    for round_number in folder.checkpoint_rounds():
        path = folder.checkpoint_dir(round_number) / "round.json"
        if path.exists():
            found.append((str(path), _json_object(read_bounded(path).decode("utf-8", "replace"))))
    return found


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UnsafeFileError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise UnsafeFileError("a metrics record is not a JSON object")
    return value


def _metrics_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    recorded = recorded_metric_digests(entries)
    try:
        records = _metric_records(folder)
    except UnsafeFileError as error:
        return [VerifyProblem(None, f"metrics: {error}")]
    problems: list[VerifyProblem] = []
    for where, record in records:
        round_number = record.get("round")
        seq, digest = (
            recorded.get(round_number, (None, None))
            if isinstance(round_number, int)
            else (None, None)
        )
        if digest is None:
            continue  # not ledgered: the report marks it unverified
        if record_digest(record) != digest:
            problems.append(
                VerifyProblem(
                    seq,
                    f"{where}: round {round_number}'s metrics are not the ones the ledger "
                    f"records (metrics sha256 {digest}); they were edited",
                )
            )
    return problems


def outputs_match_ledger(folder: RunFolder) -> ExtraCheck:
    """An extra ledger check: final/, status.json and the metrics against the ledger."""

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        return [
            *_final_problems(folder, entries),
            *_status_problems(folder, entries),
            *_metrics_problems(folder, entries),
        ]

    return check
