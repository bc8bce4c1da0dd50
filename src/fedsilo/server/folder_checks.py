"""What a run folder hands out, held to its verified ledger: final/, status and metrics.

Extra checks of ``fedsilo audit verify`` (they see only entries whose chain and signatures
verified, see :mod:`fedsilo.ledger.verify`):

- ``final/``: its files are exactly the ones the ``run_finished`` entry records (file sha256 of
  ``adapter_model.safetensors`` and ``adapter_config.json``; ledgers written before these were
  recorded bind the weights through their tensors' digest), and the final adapter is the last
  aggregate the ledger records; a run whose status.json says it completed, and whose
  ``run_finished`` records a final adapter, must have final/ (only a crash while finishing
  leaves none; a clustered run's experts are in their own run folders);
- ``status.json`` saying "completed": the ledger ends with ``run_finished`` (a ledger cut at
  its end, with final/ and the last round's files removed, no longer passes);
- metrics: every line of ``metrics.jsonl`` is a record with an integer ``round`` (and counts
  and figures of their types), of a round the ledger records, hashing to the
  ``metrics_sha256`` the ledger recorded for that round (the baseline of round 0 in
  ``baseline_evaluated``), once and in round order; every digest the ledger records has its
  record, except the last round's when the run stopped before writing it; each
  ``checkpoints/round-N/round.json`` is round N's recorded record. A round whose entry has no
  digest (ledgers written before it was recorded) is marked unverified in the compliance
  report, not passed off as verified.

Files are read only when they are regular files below a size limit; paths a ledger entry
names must stay inside the run folder, and any symbolic link in the run folder that leads out
of it is itself a problem (:func:`links_out_of`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.ledger import Entry, EntryKind, ExtraCheck, VerifyProblem
from fedsilo.model.adapters import adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.server.rounds import adapter_digest
from fedsilo.server.run_folder import RunFolder, record_digest
from fedsilo.storage import open_regular_file, read_regular_file

MAX_HASHED_BYTES = 16 * 1024**3
"""Largest file the audit hashes (streamed): far above any adapter, far below a disk-filler."""
MAX_PARSED_BYTES = 2 * 1024**3
"""Largest adapter file the audit loads into memory to parse."""
MAX_METRICS_BYTES = 256 * 1024**2
"""Largest metrics.jsonl the audit parses (a round's record is a few kilobytes; parsed JSON
takes several times its text in memory)."""
MAX_ROUND_RECORD_BYTES = 16 * 1024**2
"""Largest checkpoint round.json the audit parses."""
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
FINAL_ADAPTER_FIELDS = ("final_files", "final_adapter_sha256", "final_peft_sha256")
"""Fields of a run_finished entry that record an adapter in final/."""


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


MAX_WALKED_ENTRIES = 1_000_000
"""Most files and folders the audit looks at for links out of a run folder."""


def links_out_of(root: Path) -> list[VerifyProblem]:
    """A problem for each symbolic link in the run folder ``root`` whose target is outside it.

    The audit reads a run folder's own files by their fixed names (metrics.jsonl, the
    checkpoints, receipts); a link among them would have it read, hash and quote a file from
    elsewhere on the auditor's machine as if the run folder held it. fedsilo writes no links.
    """
    base = Path(root).resolve()
    problems: list[VerifyProblem] = []
    walked = 0
    for folder, dirs, files in os.walk(base, followlinks=False):
        for name in (*dirs, *files):
            walked += 1
            if walked > MAX_WALKED_ENTRIES:
                return [
                    *problems,
                    VerifyProblem(
                        None,
                        f"{root}: more than {MAX_WALKED_ENTRIES} files; not all "
                        "checked for links out of the run folder",
                    ),
                ]
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if target != base and base not in target.parents:
                    problems.append(
                        VerifyProblem(None, f"{path} links to {target}, outside the run folder")
                    )
    return problems


def hash_file(path: Path, *, limit: int = MAX_HASHED_BYTES) -> str:
    """sha256 hex of a regular file of at most ``limit`` bytes, read in chunks (checked on
    the open descriptor, as :func:`fedsilo.storage.open_regular_file` does)."""
    digest = hashlib.sha256()
    read = 0
    try:
        with open_regular_file(path, limit=limit) as handle:
            while chunk := handle.read(1 << 20):
                read += len(chunk)
                if read > limit:  # the file grew while it was read
                    raise UnsafeFileError(f"{path}: over the audit's {limit}-byte limit")
                digest.update(chunk)
    except OSError as error:
        raise UnsafeFileError(f"{path}: cannot be read: {error.strerror}") from None
    except UnsafeFileError:
        raise
    except ValueError as error:
        raise UnsafeFileError(str(error)) from None
    return digest.hexdigest()


def read_bounded(path: Path, *, limit: int = MAX_PARSED_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see
    :func:`fedsilo.storage.read_regular_file`); UnsafeFileError otherwise."""
    try:
        return read_regular_file(path, limit=limit)
    except OSError as error:
        raise UnsafeFileError(f"{path}: cannot be read: {error.strerror}") from None
    except ValueError as error:
        raise UnsafeFileError(str(error)) from None


def _last(entries: Sequence[Entry], kind: EntryKind) -> Entry | None:
    found = [entry for entry in entries if entry.kind is kind]
    return found[-1] if found else None


def _final_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    finished = _last(entries, EntryKind.RUN_FINISHED)
    if finished is None:
        return []  # a final/ without run_finished is reported by checkpoints_match_ledger
    payload = finished.payload
    if not folder.final_dir.exists():
        # A crash between run_finished and putting final/ in place leaves none (a resumed run
        # finishes again); a run that says it completed must hand out the final adapter its
        # entry records (a clustered run records experts instead, in their own run folders).
        records_final = any(name in payload for name in FINAL_ADAPTER_FIELDS)
        if records_final and _claims_completed(folder):
            return [
                VerifyProblem(
                    finished.seq,
                    f"{folder.status_path} says the run completed, but {folder.final_dir} is "
                    "missing: the final adapter run_finished records cannot be checked",
                )
            ]
        return []
    if not folder.final_dir.is_dir():
        return [VerifyProblem(finished.seq, f"{folder.final_dir} is not a folder")]
    problems: list[VerifyProblem] = []
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
    except (ModelError, UnsafeFileError) as error:
        return [VerifyProblem(seq, f"{path}: {error}")]
    last = folder.latest_checkpoint_round()
    if last is not None:
        checkpoint = folder.checkpoint_dir(last) / "adapter.safetensors"
        try:
            names = set(adapter_from_bytes(read_bounded(checkpoint)))
        except (ModelError, UnsafeFileError) as error:
            return [VerifyProblem(seq, f"{checkpoint}: {error}")]
        tensors = {name: tensor for name, tensor in tensors.items() if name in names}
    if adapter_digest(tensors) != digest:
        return [
            VerifyProblem(seq, f"{path} does not hold the final adapter {digest} of the ledger")
        ]
    return []


def _claims_completed(folder: RunFolder) -> bool:
    """Whether a readable status.json says "completed" (an unreadable one is reported by
    :func:`_status_problems`)."""
    try:
        return bool(folder.read_json(folder.status_path).get("status") == "completed")
    except (OSError, ValueError):
        return False


def _status_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    try:
        status = folder.read_json(folder.status_path).get("status")
    except FileNotFoundError:
        return []  # no status file: nothing claimed
    except (OSError, ValueError) as error:
        return [VerifyProblem(None, f"{folder.status_path} cannot be read: {error}")]
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
            if isinstance(round_number, int) and not isinstance(round_number, bool):
                recorded[round_number] = (entry.seq, digest if isinstance(digest, str) else None)
    return recorded


_COUNT_FIELDS = ("round", "attempts", "sites_ok", "sites_failed", "gold_count")
_FIGURE_FIELDS = ("train_loss", "gold_accuracy", "gold_category_accuracy", "gold_loss")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MetricsLine:
    """One non-blank line of ``metrics.jsonl`` (or one ``round.json``) as read.

    ``where`` names the file and line; ``record`` is the JSON object, None where the line is
    not one; ``problem`` says why the line cannot be a round's record (not JSON, no integer
    ``round``, a count or figure of the wrong type), None when it can.
    """

    where: str
    record: dict[str, Any] | None
    problem: str | None

    @property
    def round(self) -> int | None:
        """The record's round, where the line is a well-formed record."""
        if self.record is None or self.problem is not None:
            return None
        value = self.record["round"]
        return value if _is_int(value) else None


def _metrics_line(where: str, text: str) -> MetricsLine:
    try:
        value = json.loads(text)
    except ValueError as error:
        return MetricsLine(where, None, f"not JSON ({error})")
    except RecursionError:
        return MetricsLine(where, None, "JSON nested too deeply")
    if not isinstance(value, dict):
        return MetricsLine(where, None, f"a {type(value).__name__}, not a JSON object")
    if not _is_int(value.get("round")):
        return MetricsLine(
            where, value, f"field 'round' is {value.get('round')!r}, not an integer round number"
        )
    for name in _COUNT_FIELDS:
        field = value.get(name)
        if field is not None and not (_is_int(field) and field >= 0):
            return MetricsLine(where, value, f"field {name!r} is {field!r}, not a count")
    for name in _FIGURE_FIELDS:
        field = value.get(name)
        if field is not None and (isinstance(field, bool) or not isinstance(field, int | float)):
            return MetricsLine(where, value, f"field {name!r} is {field!r}, not a number")
    return MetricsLine(where, value, None)


def read_metrics_lines(folder: RunFolder) -> list[MetricsLine]:
    """Every non-blank line of the run's ``metrics.jsonl``, in order (none without the file).

    Raises UnsafeFileError when the file is not a regular file inside the size limit.
    """
    if not folder.metrics_path.exists():
        return []
    text = read_bounded(folder.metrics_path, limit=MAX_METRICS_BYTES).decode(
        "utf-8", errors="replace"
    )
    return [
        _metrics_line(f"{folder.metrics_path} line {number}", line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def verified_metrics(folder: RunFolder, entries: Sequence[Entry]) -> dict[int, dict[str, Any]]:
    """Round -> the ``metrics.jsonl`` record whose sha256 is the one the ledger records for
    that round (rounds without such a record are left out)."""
    recorded = recorded_metric_digests(entries)
    try:
        lines = read_metrics_lines(folder)
    except UnsafeFileError:
        return {}
    found: dict[int, dict[str, Any]] = {}
    for line in lines:
        number = line.round
        if number is None or line.record is None:
            continue
        digest = recorded.get(number, (None, None))[1]
        if digest is not None and record_digest(line.record) == digest:
            found.setdefault(number, line.record)
    return found


def last_aggregated_round(entries: Sequence[Entry]) -> int | None:
    """The last round the ledger records an aggregate (or the baseline, round 0) of."""
    rounds = recorded_metric_digests(entries)
    return max(rounds) if rounds else None


def _may_lack_its_record(
    folder: RunFolder, entries: Sequence[Entry], seq: int, number: int
) -> bool:
    """Whether round ``number``, recorded by entry ``seq``, may honestly have no metrics.jsonl
    record: the coordinator ledgers a round, then writes its checkpoint, then appends its
    record, so a crash (or a coordinator still at work) can leave the last round without one.
    Anything it ledgered after that entry came after the record, except a resumed run's
    ``run_resumed``, which rewrites metrics.jsonl from the checkpoints: the round's record is
    then missing only if its checkpoint is too (and the round is run again or fails)."""
    later = [entry for entry in entries if entry.seq > seq]
    if not later:
        return True
    return later[0].kind is EntryKind.RUN_RESUMED and not folder.checkpoint_dir(number).exists()


def _jsonl_problems(
    folder: RunFolder, entries: Sequence[Entry], lines: Sequence[MetricsLine]
) -> list[VerifyProblem]:
    """metrics.jsonl against the ledger: each record well-formed, of a round the ledger
    records, hashing to that round's metrics_sha256, once, in round order; and every digest
    the ledger records has its record (but see :func:`_may_lack_its_record`)."""
    recorded = recorded_metric_digests(entries)
    problems: list[VerifyProblem] = []
    present: set[int] = set()
    previous: int | None = None
    for line in lines:
        number = line.round
        if line.problem is not None or number is None or line.record is None:
            problems.append(VerifyProblem(None, f"{line.where}: {line.problem}"))
            continue
        if previous is not None and number <= previous:
            problems.append(
                VerifyProblem(
                    None,
                    f"{line.where}: a record of round {number} after one of round {previous}: "
                    "the records are out of order or repeated",
                )
            )
        previous = number if previous is None else max(previous, number)
        present.add(number)
        if number not in recorded:
            problems.append(
                VerifyProblem(None, f"{line.where}: round {number} is not recorded in the ledger")
            )
            continue
        seq, digest = recorded[number]
        if digest is None:
            continue  # a ledger from before metrics digests: the report marks it unverified
        if record_digest(line.record) != digest:
            problems.append(_edited(seq, line.where, number, digest))
    for number, (seq, digest) in sorted(recorded.items()):
        if digest is None or number in present:
            continue
        if _may_lack_its_record(folder, entries, seq, number):
            continue
        problems.append(
            VerifyProblem(
                seq,
                f"{folder.metrics_path} holds no record of round {number}, whose metrics the "
                f"ledger records (metrics sha256 {digest}): it was deleted or edited",
            )
        )
    return problems


def _edited(seq: int | None, where: str, number: int, digest: str) -> VerifyProblem:
    """A record of round ``number`` at ``where`` that does not hash to the ledgered digest."""
    return VerifyProblem(
        seq,
        f"{where}: round {number}'s metrics are not the ones the ledger records "
        f"(metrics sha256 {digest}); they were edited",
    )


def _round_json_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    """Each checkpoint's round.json is the record of its round that the ledger records."""
    recorded = recorded_metric_digests(entries)
    problems: list[VerifyProblem] = []
    for number in folder.checkpoint_rounds():
        seq, digest = recorded.get(number, (None, None))
        path = folder.checkpoint_dir(number) / "round.json"
        if not path.exists():
            if digest is not None:
                problems.append(
                    VerifyProblem(
                        seq, f"{path} is missing; the ledger records round {number}'s metrics"
                    )
                )
            continue
        text = read_bounded(path, limit=MAX_ROUND_RECORD_BYTES).decode("utf-8", "replace")
        line = _metrics_line(str(path), text)
        if line.problem is not None or line.record is None:
            problems.append(VerifyProblem(seq, f"{path}: {line.problem}"))
        elif line.round != number:
            problems.append(
                VerifyProblem(seq, f"{path}: the record is of round {line.round}, not {number}")
            )
        elif digest is not None and record_digest(line.record) != digest:
            problems.append(_edited(seq, str(path), number, digest))
    return problems


def _metrics_problems(folder: RunFolder, entries: Sequence[Entry]) -> list[VerifyProblem]:
    try:
        lines = read_metrics_lines(folder)
        return [*_jsonl_problems(folder, entries, lines), *_round_json_problems(folder, entries)]
    except UnsafeFileError as error:
        return [VerifyProblem(None, f"metrics: {error}")]


def outputs_match_ledger(folder: RunFolder) -> ExtraCheck:
    """An extra ledger check: final/, status.json and the metrics against the ledger."""

    def check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        return [
            *_final_problems(folder, entries),
            *_status_problems(folder, entries),
            *_metrics_problems(folder, entries),
        ]

    return check
